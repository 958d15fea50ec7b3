"""Training and evaluation: typed configs, the training loop, checkpoints, metrics and plots.

    >>> from cnnlab.engine import TrainConfig, train
    >>> config = TrainConfig(epochs=3)
    >>> config.optim.lr = 0.1
    >>> result = train(config)            # doctest: +SKIP
    >>> result.test.accuracy, result.run_dir  # doctest: +SKIP
"""
from cnnlab.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, apply_overrides
from cnnlab.engine.evaluate import EvalResult, evaluate
from cnnlab.engine.trainer import RunResult, TrainingDiverged, resolve_device, train

__all__ = [
    "Checkpoint", "DataConfig", "EvalResult", "ModelConfig", "OptimConfig", "RunResult", "TrainConfig", "TrainingDiverged",
    "apply_overrides", "evaluate", "load_checkpoint", "resolve_device", "save_checkpoint", "train",
]
