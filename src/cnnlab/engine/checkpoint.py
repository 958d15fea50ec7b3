"""Checkpoints: safetensors weights + safetensors optimiser/EMA tensors + a JSON of the rest, written atomically.

A checkpoint ``<tag>`` in a run folder is three files:

- ``<tag>.safetensors``: the model's state_dict (loadable by ``cnnlab.load_weights`` and
  ``create_model(weights=...)``);
- ``<tag>.state.safetensors``: optimiser state tensors (``optim.<param index>.<name>``), EMA weights (``ema.<key>``)
  and the tensors of the data's preprocessing (``preprocess.<name>``: PCA/ZCA mean and matrix);
- ``<tag>.json``: epoch, step, optimiser hyper-parameters, history, best metric.

Each file is written to a temporary name and moved into place with ``os.replace``, the JSON
last; all three carry the same random token, so a reader detects a set torn by a crash.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnlab._errors import CnnlabError
from cnnlab._io import atomic_write, dumps_json


@dataclass
class Checkpoint:
    """What a checkpoint holds once read back."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    ema: dict[str, torch.Tensor] | None
    meta: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, torch.Tensor] = field(default_factory=dict)  # empty for checkpoints written before


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], token: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"cnnlab_token": token}))


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors by 'optim.<idx>.<name>', JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, per_param in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(per_param)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(run_dir: str | os.PathLike, tag: str, model: torch.nn.Module, meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, ema: dict[str, torch.Tensor] | None = None,
                    preprocess: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``tag`` (``best``, ``last``) into ``run_dir``; returns the weights path.

    ``preprocess`` holds the data's preprocessing tensors (``DataBundle.preprocess_tensors``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    weights = run_dir / f"{tag}.safetensors"
    _save_tensors(weights, model.state_dict(), token)
    extra: dict[str, torch.Tensor] = {}
    meta = dict(meta, token=token)
    if optimizer is not None:
        tensors, rest = _split_optimizer(optimizer.state_dict())
        extra.update(tensors)
        meta["optimizer"] = rest
    if ema is not None:
        extra.update({f"ema.{k}": v for k, v in ema.items()})
    if preprocess:
        extra.update({f"preprocess.{k}": v for k, v in preprocess.items()})
    _save_tensors(run_dir / f"{tag}.state.safetensors", extra, token)
    text = dumps_json(meta, indent=1, default=_json_default)  # valid JSON even if a metric is NaN
    atomic_write(run_dir / f"{tag}.json", lambda tmp: Path(tmp).write_text(text))
    return weights


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    from safetensors import safe_open

    if not path.is_file():
        raise CnnlabError(f"checkpoint file missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            token = (f.metadata() or {}).get("cnnlab_token")
            return {k: f.get_tensor(k) for k in f.keys()}, token
    except Exception as e:  # safetensors raises its own types for bad headers and short files
        raise CnnlabError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {e})") from None


def load_checkpoint(run_dir: str | os.PathLike, tag: str = "last") -> Checkpoint:
    """Read checkpoint ``tag``; a missing, corrupt, truncated or torn set raises a CnnlabError naming the file.

    The preprocessing tensors are also put into ``meta["preprocess"]["tensors"]``, so the state a run
    folder records is complete: ``preprocess_from_state(meta["preprocess"])`` rebuilds PCA/ZCA whitening.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / f"{tag}.json"
    if not meta_path.is_file():
        raise CnnlabError(f"no checkpoint {tag!r} in {run_dir} (expected {meta_path.name})")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or "token" not in meta:
            raise ValueError("no token")
    except (ValueError, UnicodeDecodeError) as e:
        raise CnnlabError(f"checkpoint file {meta_path} is corrupt or truncated ({e})") from None
    weights, t1 = _read_tensors(run_dir / f"{tag}.safetensors")
    extra, t2 = _read_tensors(run_dir / f"{tag}.state.safetensors")
    if not (t1 == t2 == meta["token"]):
        raise CnnlabError(f"checkpoint {tag!r} in {run_dir} is inconsistent: its files come from different saves "
                          "(a crash during writing?); use the other checkpoint or start again")
    optim_tensors = {k: v for k, v in extra.items() if k.startswith("optim.")}
    ema = {k[4:]: v for k, v in extra.items() if k.startswith("ema.")} or None
    optimizer = _join_optimizer(optim_tensors, meta.pop("optimizer")) if "optimizer" in meta else None
    preprocess = {k[len("preprocess."):]: v for k, v in extra.items() if k.startswith("preprocess.")}
    if preprocess and isinstance(meta.get("preprocess"), dict):
        meta["preprocess"] = dict(meta["preprocess"], tensors=preprocess)
    return Checkpoint(weights=weights, optimizer=optimizer, ema=ema, meta=meta, preprocess=preprocess)
