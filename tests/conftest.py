"""Test-wide settings."""
import os

import matplotlib
import torch

matplotlib.use("Agg")
# pytest-xdist runs one worker per core; a second intra-op thread per worker only makes the
# workers fight over the same cores (measured: 30 LeNet steps 16 s with 2 threads vs 0.2 s with 1).
torch.set_num_threads(int(os.environ.get("CNNLAB_TEST_THREADS", "1")))


def pytest_sessionstart(session):
    """The CPU and the free disk on the first line of every run, CI's logs included (``-q`` hides pytest's own
    header): a failure that only one kind of machine shows is then read with the machine beside it."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or hasattr(session.config, "workerinput"):  # an xdist worker: the controller prints it
        return
    import shutil
    import tempfile

    from cnnlab._platform import cpu_flags, cpu_has_bf16, cpu_name

    reporter.write_line(f"cpu: {cpu_name()} [{cpu_flags()}], {os.cpu_count()} cores; native bf16: "
                        f"{'yes' if cpu_has_bf16() else 'no'}; torch {torch.__version__}, kernels "
                        f"{torch.backends.cpu.get_cpu_capability()}; "
                        f"{shutil.disk_usage(tempfile.gettempdir()).free / 2**30:.1f} GiB free in {tempfile.gettempdir()}")
