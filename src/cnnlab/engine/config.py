"""Typed run configuration: one dataclass per concern, printed at start, saved as JSON, overridable.

``apply_overrides(config, ["optim.lr=0.1", "data.flip=true", "epochs=3"])`` sets fields by
dotted path with type checking; an unknown key raises with the closest valid keys.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab._io import dumps_json
from cnnlab.data.config import DataConfig  # the data layer's section; re-exported here


@dataclass
class ModelConfig:
    """Which network, from which weights, and which parts train.

    Args:
        name: a registry name (``cnnlab models``).
        weights: None (random init), a weights file, or ``"torchvision"``/``"timm"`` pretrained.
        options: architecture overrides passed to ``create_model`` (``{"drop_rate": 0.3}``).
        freeze: module-name prefixes whose parameters do not train (``["stem", "stages.0"]``).
        lr_mult: module-name prefix -> learning-rate multiplier (discriminative learning rates).
        channels_last: NHWC memory format (faster convolutions on CPU and tensor cores).
        compile: wrap the model in ``torch.compile`` (the first steps then take seconds to minutes).
        compile_mode: torch.compile's mode: ``default``, ``reduce-overhead`` (CUDA graphs: fewer kernel
            launches for small networks), ``max-autotune`` or ``max-autotune-no-cudagraphs``.
    """

    name: str = "simple_cnn_bn"
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)
    lr_mult: dict[str, float] = field(default_factory=dict)
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"


@dataclass
class OptimConfig:
    """Optimiser, schedule and regularisation.

    Args:
        optimizer: ``sgd`` (momentum), ``adam`` or ``adamw``.
        lr: peak learning rate; with ``base_batch_size`` > 0 it is scaled by batch_size / base_batch_size
            (the linear rule of Goyal et al. 2017).
        schedule: ``constant``, ``step`` (x ``gamma`` every ``step_epochs``), ``cosine`` or ``onecycle``.
        warmup_epochs: linear warm-up from 0 (constant, step and cosine schedules).
        onecycle_pct: share of the steps spent rising in the one-cycle schedule.
        weight_decay: decoupled (AdamW) or coupled (SGD, Adam) decay, not applied to biases and norms.
        l1, l2: explicit penalties added to the loss (sum of |w| and of w^2 over weight tensors).
        clip_grad_norm: clip the global gradient norm (0 = off).
        ema_decay: keep an exponential moving average of the weights and evaluate it (0 = off).
    """

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    onecycle_pct: float = 0.25
    step_epochs: int = 10
    gamma: float = 0.1
    base_batch_size: int = 0
    label_smoothing: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    clip_grad_norm: float = 0.0
    ema_decay: float = 0.0


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015; docs/distillation.md): a classifier, or an SSD detector.

    Args:
        teacher: a run folder of a trained classifier on the same data (None = no distillation); for an SSD
            detector, a classifier of the detection data's classes, which classifies each training box's crop.
        temperature: T, the softmax temperature of the soft targets (> 0).
        alpha: the weight of the soft (teacher) term, in [0, 1]; the labels' cross-entropy gets 1 - alpha.
            The loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``. For a detector the
            soft term, weighted by alpha, is added to the detector's own losses, which stay whole (they hold the
            background and the boxes).
    """

    teacher: str | None = None
    temperature: float = 4.0
    alpha: float = 0.9


@dataclass
class TrainConfig:
    """A whole run.

    Args:
        epochs: number of epochs (without a ``time_budget`` the run does not depend on wall time, so it
            repeats exactly; with one, the upper limit).
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
        amp: mixed precision: ``auto`` (bf16 on CUDA, off on CPU), ``bf16`` or ``none``.
        threads: CPU threads for torch (0 = torch's default).
        patience: early stopping after this many epochs without improvement of ``monitor`` (0 = off).
        monitor: ``val_loss`` or ``val_<metric>`` of the task (``val_acc``, ``val_psnr``; needs
            ``data.val_fraction`` > 0); checked against the model's task when the run starts.
        tta_flip: also evaluate on left-right flipped images and average the logits.
        out_dir, name: the run folder is ``out_dir/name`` (name defaults to model-data-date).
        task: ``auto`` (the model's registry task: ``cnnlab models --task``), or a task name
            (``classification``, ``reconstruction``) that must match the model's.
        loss: ``auto`` (the task's default), or one the task offers (reconstruction: ``mse``, ``bce``).
        time_budget: seconds the whole run may take (0 = off). The first steps are timed, then the
            number of steps is fixed so that training, evaluation and reports end within it; the
            schedule is laid over those steps. ``epochs`` stays the upper limit.
        distill: knowledge distillation from a teacher run (``DistillConfig``; off by default).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    threads: int = 0
    patience: int = 0
    monitor: str = "val_loss"
    tta_flip: bool = False
    out_dir: str = "runs"
    name: str = ""
    plots: bool = True
    quiet: bool = False
    task: str = "auto"
    loss: str = "auto"
    time_budget: float = 0.0
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return dumps_json(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise CnnlabError(f"a config must be a dict of config keys (as in a run's config.json), "
                              f"got {type(data).__name__}")
        config = cls()
        # a string goes in quoted but unescaped: _parse strips the outer quotes only, so json.dumps' escapes
        # ('r"1' -> 'r\\"1') would not round-trip
        apply_overrides(config, [f'{k}="{v}"' if isinstance(v, str) else f"{k}={json.dumps(v)}"
                                 for k, v in _flatten(data).items()])
        return config

    def describe(self) -> str:
        """The configuration as ``section.key = value`` lines (printed at the start of a run)."""
        return "\n".join(f"  {k} = {v!r}" for k, v in _flatten(self.to_dict()).items())


SECTIONS = ("model", "data", "optim", "distill")  # the TrainConfig fields that are sections of keys


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k in SECTIONS and not prefix:
            out.update(_flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def config_keys(config: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config dataclass."""
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _parse(text: str, kind: Any, key: str) -> Any:
    """Turn the text after '=' into a value of the annotated type, or raise naming the key."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            return _parse(text, arg, key)
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind in (int, float):
            value = float(text)  # ints: accept '3' and '3.0', reject '3.5'
            if not math.isfinite(value):  # 'nan', 'inf', '1e400': no setting can use them (NaN passes `<= 0`)
                example = "a whole number such as 3" if kind is int else "a number such as 0.1"
                raise CnnlabError(f"{key}: {text!r} is not a finite number; expected {example}")
            if kind is float:
                return value
            if value != int(value):
                raise ValueError
            return int(value)
        if kind is str:
            return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text
        if origin in (list, tuple, dict):
            value = _literal(text)
            if origin is dict:
                if not isinstance(value, dict):
                    raise ValueError
                vtype = args[1] if args else Any
                return {str(k): (v if vtype is Any else _parse(json.dumps(v), vtype, key)) for k, v in value.items()}
            if isinstance(value, (str, int, float)):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            if origin is tuple:
                if len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
                    raise ValueError
                return tuple(_parse(str(v), args[0], key) for v in value)
            return [_parse(str(v), args[0], key) if args else v for v in value]
    except CnnlabError:  # a CnnlabError is a ValueError: let the finite-number message through
        raise
    except (ValueError, SyntaxError, TypeError):
        pass
    raise CnnlabError(f"{key}: cannot read {text!r} as {getattr(kind, '__name__', kind)}")


def _json_or_python(text: str) -> Any:
    """``text`` read as JSON, else as a Python literal; a ValueError when it is neither."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except SyntaxError as e:
        raise ValueError(str(e)) from None


def _literal(text: str) -> Any:
    try:
        return _json_or_python(text)
    except ValueError:
        inner = text.strip()
        if inner[:1] == "[" and inner[-1:] == "]":  # '[stem,stages.0]': a list typed without quotes
            inner = inner[1:-1]
        return [t.strip() for t in inner.split(",") if t.strip()]  # 'stem,stages.0' -> list


# dict fields whose entries can be set one at a time: --set model.options.backbone=resnet18
DICT_KEYS = ("model.options", "model.lr_mult")


def _option_value(text: str) -> Any:
    """A model option's value: JSON or a Python literal (3, 0.5, true, [1, 2], "x"), else the text itself."""
    try:
        return _json_or_python(text)
    except ValueError:
        return text


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Set ``section.key=value`` fields in place, checking keys and types."""
    keys = config_keys(config)
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):
        raise CnnlabError(f"overrides must be a list of 'key=value' strings, e.g. ['optim.lr=0.1'], "
                          f"got {type(overrides).__name__}")
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise CnnlabError(f"override {item!r} must look like key=value (e.g. optim.lr=0.1)")
        key, text = (s.strip() for s in item.split("=", 1))
        head = next((h for h in DICT_KEYS if key.startswith(h + ".") and len(key) > len(h) + 1), None)
        if key not in keys and head is not None:  # model.options.backbone=resnet18, model.lr_mult.stages.0=0.1
            section, field_name = head.split(".")
            value = _parse(text, float, key) if head == "model.lr_mult" else _option_value(text)
            getattr(getattr(config, section), field_name)[key[len(head) + 1:]] = value
            continue
        if key not in keys:
            # a bare 'lr' probably means 'optim.lr'
            matches = [k for k in keys if k.endswith("." + key)]
            hint = f"; did you mean {', '.join(matches)}?" if matches else did_you_mean(key, keys)
            raise CnnlabError(f"unknown config key {key!r}{hint}")
        *path, last = key.split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        hints = typing.get_type_hints(type(target))
        setattr(target, last, _parse(text, hints[last], key))
    validate(config)
    return config


def _non_finite(value: Any) -> float | None:
    """The first NaN or infinity inside ``value`` (numbers, lists, tuples, dict values), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((bad for bad in map(_non_finite, items) if bad is not None), None)


def check_run_name(name: str, flag: str) -> None:
    """A run name is one folder name inside ``out_dir``: no separators, no '..', so a run cannot write elsewhere."""
    if not isinstance(name, str):
        raise CnnlabError(f"{flag} must be a folder name, got {type(name).__name__}")
    if not name:
        return  # "" = the default name (model-data-date)
    # both separators on every OS: a config that is safe here must stay safe on Windows
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name or name != name.strip():
        raise CnnlabError(f"{flag} {name!r} must be one folder name (the run folder is out_dir/name), without "
                          "'/', '\\', surrounding spaces, or '.'/'..'; put the parent folders in out_dir instead")


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"  # 90, 1.5, .5 (no sign, no exponent: '1e400' and '-3' are not durations)
# a bare number is seconds; otherwise every part names its unit ('1h30' is ambiguous, so refused)
_DURATION = re.compile(rf"(?P<bare>{_NUMBER})|(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m(?:in)?)?(?:(?P<s>{_NUMBER})s)?")
DURATION_FORMS = "seconds (300, 90s) or with units (4m, 1.5h, 1h30m)"


def parse_duration(text: str, flag: str = "--time-budget") -> float:
    """``"4m"`` -> 240.0 seconds; accepts ``90``, ``90s``, ``4m``, ``1h30m``, ``1.5h``; refuses zero, negatives and NaN."""
    match = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None or not any(match.groupdict().values()):
        raise CnnlabError(f"{flag} {text!r} is not a duration; expected {DURATION_FORMS}")
    parts = match.groupdict()
    seconds = sum(float(parts[unit] or 0) * scale for unit, scale in (("h", 3600), ("m", 60), ("s", 1), ("bare", 1)))
    if not math.isfinite(seconds) or seconds <= 0:  # a run of 400 digits still reads as inf
        raise CnnlabError(f"{flag} {text!r} must be a positive, finite duration; expected {DURATION_FORMS}")
    return seconds


CHOICES = {
    "optim.optimizer": ("sgd", "adam", "adamw"),
    "optim.schedule": ("constant", "step", "cosine", "onecycle"),
    "data.normalize": ("standard", "pca", "zca", "none"),
    "amp": ("auto", "bf16", "none"),
    "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


def validate(config: TrainConfig) -> None:
    """Reject values no run can use, naming the field and what it accepts."""
    for key, value in _flatten(config.to_dict()).items():  # a config built in Python skips _parse's check
        if _non_finite(value) is not None:
            raise CnnlabError(f"{key} must hold finite numbers (no NaN or infinity), got {value!r}")
    check_run_name(config.name, "name")
    for key in ("task", "loss"):  # which names are valid depends on the model's task: checked when it is built
        value = getattr(config, key)
        if not isinstance(value, str) or not value.strip():
            raise CnnlabError(f"{key} must be a non-empty name ('auto' picks the model's default), got {value!r}")
    if config.time_budget < 0:
        raise CnnlabError(f"time_budget must be >= 0 seconds (0 = off), got {config.time_budget}")
    for key, choices in CHOICES.items():
        target: Any = config
        for part in key.split("."):
            target = getattr(target, part)
        if target not in choices:
            raise CnnlabError(f"{key}={target!r} is not one of {', '.join(choices)}{did_you_mean(str(target), choices)}")
    positive = {"epochs": config.epochs, "data.batch_size": config.data.batch_size,
                "data.eval_batch_size": config.data.eval_batch_size, "optim.lr": config.optim.lr}
    for key, value in positive.items():
        if value <= 0:
            raise CnnlabError(f"{key} must be positive, got {value}")
    if not 0 <= config.data.val_fraction < 1:
        raise CnnlabError(f"data.val_fraction must be in [0, 1), got {config.data.val_fraction}")
    d, o = config.data, config.optim
    # 0 means "off" for most of these; a negative value would crash mid-run (threads, crop_padding, momentum)
    # or silently do something else (train_limit=-5 drops the last 5 images, cutout=-3 is off)
    non_negative = {"threads": config.threads, "patience": config.patience, "data.train_limit": d.train_limit,
                    "data.num_workers": d.num_workers, "data.crop_padding": d.crop_padding, "data.cutout": d.cutout,
                    "data.mixup": d.mixup, "data.cutmix": d.cutmix, "data.image_size": d.image_size or 0,
                    "optim.momentum": o.momentum, "optim.weight_decay": o.weight_decay,
                    "optim.warmup_epochs": o.warmup_epochs, "optim.l1": o.l1, "optim.l2": o.l2,
                    "optim.clip_grad_norm": o.clip_grad_norm, "optim.base_batch_size": o.base_batch_size}
    for key, value in non_negative.items():
        if value < 0:
            raise CnnlabError(f"{key} must be >= 0 (0 = off or default), got {value}")
    fractions = {"optim.label_smoothing": (o.label_smoothing, "[0, 1]"), "data.resized_crop_scale":
                 (d.resized_crop_scale, "[0, 1] (the smallest crop area as a fraction; 0 = off)")}
    for key, (value, expected) in fractions.items():
        if not 0 <= value <= 1:
            raise CnnlabError(f"{key} must be in {expected}, got {value}")
    if not 0 <= o.ema_decay < 1:
        raise CnnlabError(f"optim.ema_decay must be in [0, 1) (e.g. 0.999; 0 = off), got {o.ema_decay}")
    if not 0 < o.onecycle_pct < 1:
        raise CnnlabError(f"optim.onecycle_pct must be in (0, 1) (share of steps rising), got {o.onecycle_pct}")
    if not all(0 <= b < 1 for b in o.betas):
        raise CnnlabError(f"optim.betas must both be in [0, 1), e.g. [0.9, 0.999], got {list(o.betas)}")
    if o.step_epochs < 1 or o.gamma <= 0:
        raise CnnlabError(f"the step schedule needs optim.step_epochs >= 1 and optim.gamma > 0, "
                          f"got step_epochs={o.step_epochs}, gamma={o.gamma}")
    if not 0 < d.scale[0] <= d.scale[1]:
        raise CnnlabError(f"data.scale must be [low, high] with 0 < low <= high (1, 1 = off), got {list(d.scale)}")
    negative = {k: v for k, v in config.model.lr_mult.items() if v < 0}
    if negative:  # a negative learning rate climbs the loss
        raise CnnlabError(f"model.lr_mult values must be >= 0 (0 freezes, 1 = base rate), got {negative}")
    _validate_distill(config)
    if config.patience and config.data.val_fraction == 0:
        raise CnnlabError("early stopping (patience > 0) needs a validation split: set data.val_fraction, e.g. 0.1")


DISTILL_TASK = "classification"  # distillation needs class logits (B, K): the classification task's outputs


def check_distill_settings(temperature: float, alpha: float) -> None:
    """A temperature must be finite and > 0, the soft-loss weight in [0, 1]; anything else is a CnnlabError."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise CnnlabError(f"distill.temperature (--temperature) must be a finite number > 0 (Hinton et al. use "
                          f"1-20; default 4), got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise CnnlabError(f"distill.alpha (--alpha), the weight of the soft (teacher) term, must be in [0, 1] "
                          f"(1 - alpha weighs the labels), got {alpha!r}")


def _validate_distill(config: TrainConfig) -> None:
    """T > 0, alpha in [0, 1], and a teacher only for a model whose outputs are class logits."""
    distill = config.distill
    check_distill_settings(distill.temperature, distill.alpha)
    if distill.teacher is None:
        return
    if not isinstance(distill.teacher, str) or not distill.teacher.strip():
        raise CnnlabError(f"distill.teacher must be a run folder (or None), got {distill.teacher!r}")
    task = config.task
    if task == "auto":
        from cnnlab.models import list_models, model_info

        if config.model.name not in list_models():  # an unknown name gets its own message when the model is built
            return
        task = model_info(config.model.name).task
    if task not in (DISTILL_TASK, "detection"):  # a detector: checked when it is built (SSD takes a box teacher)
        raise CnnlabError(f"distill.teacher (--teacher) needs a model whose outputs are class logits (a {DISTILL_TASK} "
                          f"model, or an SSD detector), but {config.model.name} is a {task} model; leave the "
                          "teacher out")
