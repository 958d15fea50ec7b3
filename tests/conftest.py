"""Test-wide settings."""
import os

import matplotlib
import torch

matplotlib.use("Agg")
# pytest-xdist runs one worker per core; a second intra-op thread per worker only makes the
# workers fight over the same cores (measured: 30 LeNet steps 16 s with 2 threads vs 0.2 s with 1).
torch.set_num_threads(int(os.environ.get("CNNLAB_TEST_THREADS", "1")))
