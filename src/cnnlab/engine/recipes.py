"""Named training recipes: the demo's, outside the CLI so that benchmarks and notebooks can use them."""
from __future__ import annotations

from cnnlab.engine.config import TrainConfig


def demo_config(quick: bool = False, fp32: bool = False) -> TrainConfig:
    """The demo's recipe for the machine's fast path; the run's time budget (set by ``cmd_demo``) guards 300 s.

    ``fp32``: the CPU has no bf16 units (a 2-core AVX2 EPYC, say), so the run computes in fp32, fits fewer epochs
    and trains them without pad-crop (benchmarks/RESULTS.md, demo section).
    """
    from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig

    if quick:  # MNIST-5k: digits, so no flips (a mirrored 2 is not a 2)
        model = "fmnist_net"
        data = DataConfig(name="mnist_5k", batch_size=64, crop_padding=2)
        optim = OptimConfig(lr=0.05, label_smoothing=0.1)
        epochs = 10
    else:
        # fmnist_fast on every machine (RESULTS.md, demo). In bf16 (and on GPUs) it trains an epoch in about 10 s on
        # 2 Zen 4 cores, half fmnist_net's time: 18 epochs with pad-crop, 93.70% in 191 s for the whole command,
        # where fmnist_net's 9 gave 92.98% in 202 s. In fp32 (a 2-core AVX2 EPYC) about 5.4 epochs fit: the time
        # budget cuts these 8 (and lays the one-cycle schedule over what fits), and there so short a schedule
        # underfits, so no pad-crop (5 epochs: 91.63% without, 90.77% with). Peak rate 0.3 in both (fp32: +0.3
        # points at 4 and 5 epochs against 0.15; bf16, 18 epochs: 93.57% against 93.45%).
        model = "fmnist_fast"
        data = DataConfig(name="fashion_mnist", batch_size=256, flip=True, crop_padding=0 if fp32 else 2,
                          eval_batch_size=2000)
        optim = OptimConfig(lr=0.3, label_smoothing=0.1, weight_decay=5e-4)
        epochs = 8 if fp32 else 18
    return TrainConfig(model=ModelConfig(name=model, channels_last=True), data=data, optim=optim,
                       epochs=epochs, amp="auto", tta_flip=not quick, name="")
