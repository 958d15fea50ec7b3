"""Named training recipes: the demo's, outside the CLI so that benchmarks and notebooks can use them."""
from __future__ import annotations

from cnnlab.engine.config import TrainConfig


def demo_config(quick: bool = False, fp32: bool = False) -> TrainConfig:
    """The demo's recipe for the machine's fast path; the run's time budget (set by ``cmd_demo``) guards 300 s.

    ``fp32``: the CPU has no bf16 units (a 2-core AVX2 EPYC, say), so the run computes in fp32 and a
    cheaper network trains more epochs in the same time (benchmarks/RESULTS.md, demo section).
    """
    from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig

    model = "fmnist_net"
    if quick:  # MNIST-5k: digits, so no flips (a mirrored 2 is not a 2)
        data = DataConfig(name="mnist_5k", batch_size=64, crop_padding=2)
        optim = OptimConfig(lr=0.05, label_smoothing=0.1)
        epochs = 10
    elif fp32:
        # ~0.6x fmnist_net's fp32 step: about 5.4 epochs fit in the budget of a 2-core AVX2 EPYC, where the
        # time budget cuts these 8 (and lays the one-cycle schedule over what fits); faster CPUs run all 8.
        # No pad-crop: so short a schedule underfits (5 epochs: 91.63% without, 90.77% with; RESULTS.md)
        # Peak rate 0.3, not 0.15: +0.3 points at 4 and 5 epochs (0.5 gives the same as 0.3; RESULTS.md).
        model = "fmnist_fast"
        data = DataConfig(name="fashion_mnist", batch_size=256, flip=True, crop_padding=0, eval_batch_size=2000)
        optim = OptimConfig(lr=0.3, label_smoothing=0.1, weight_decay=5e-4)
        epochs = 8
    else:
        data = DataConfig(name="fashion_mnist", batch_size=256, flip=True, crop_padding=2, eval_batch_size=2000)
        optim = OptimConfig(lr=0.15, label_smoothing=0.1, weight_decay=5e-4)
        epochs = 9  # bf16 CPU: 92.98% in 218 s on 2 cores; 10 epochs gave 93.13% in 257 s
    return TrainConfig(model=ModelConfig(name=model, channels_last=True), data=data, optim=optim,
                       epochs=epochs, amp="auto", tta_flip=not quick, name="")
