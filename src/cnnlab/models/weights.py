"""Loading weights: cnnlab files, torchvision/timm checkpoints (converted), and pretrained downloads."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.models.catalog import ModelInfo, StateDict, model_info

PRETRAINED_SOURCES = ("torchvision", "timm")


@dataclass
class LoadResult:
    """What ``load_weights`` did: the layout it recognised and any keys that did not line up."""

    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # same name, other shape (skipped when not strict)
    adapted: list[str] = field(default_factory=list)  # input convs adapted from RGB to the model's channels

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


_EXPECTED = ("weights must be a safetensors file or a torch file (torch.save of a state_dict) "
             "readable with torch.load(weights_only=True)")


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 8 and head[8:9] == b"{"


def _looks_like_torch(head: bytes) -> bool:
    """torch.save writes a zip archive (PyTorch >= 1.6) or, before, a pickle (protocol byte 0x80)."""
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a state_dict from a safetensors file, or a torch file with ``weights_only=True``.

    The format is told from the file's first bytes, not its name; anything else is refused with
    what was expected (torch's own error for a text file is ``KeyError: 101``).
    """
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CnnlabError(f"{path} is not a readable safetensors file ({e}); {_EXPECTED}") from None
    if not _looks_like_torch(head):
        raise CnnlabError(f"{path} is neither a safetensors nor a torch file (it starts with {head[:8]!r}); {_EXPECTED}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CnnlabError(
            f"{path} is a torch file that torch.load(weights_only=True) cannot read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); {_EXPECTED}: it must hold tensors "
            "(a state_dict, optionally under 'state_dict' or 'model'), not pickled objects"
        ) from None
    return _unwrap(obj, str(path))


def _unwrap(obj: object, where: str) -> StateDict:
    """Accept a bare state_dict or the usual checkpoint wrappers ({'state_dict': ...}, {'model': ...})."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "ema"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            prefix = "module."  # saved from DistributedDataParallel / DataParallel
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            return tensors
    raise CnnlabError(f"{where} holds no state_dict (a mapping of names to tensors)")


def _score(state_dict: StateDict, own: StateDict) -> int:
    """How many keys of ``state_dict`` land on a same-shaped tensor of ``own``."""
    return sum(1 for k, v in state_dict.items() if k in own and own[k].shape == v.shape)


def _candidate_layouts(model: nn.Module, state_dict: StateDict) -> dict[str, StateDict]:
    """The state_dict read as cnnlab's layout and, through each converter, as each library's."""
    layouts = {"cnnlab": state_dict}
    name = getattr(model, "model_name", None)
    try:
        info = model_info(name) if name else None
    except CnnlabError:
        info = None
    if info is not None:
        # every converter of the model or its family: the pretrained sources' and others' (smp for unet, pspnet)
        for source in dict.fromkeys([*PRETRAINED_SOURCES, *info.family.converters, *info.converters]):
            convert = info.converter(source)
            if convert is None:
                continue
            try:
                layouts[source] = convert(dict(state_dict))
            except (KeyError, ValueError, RuntimeError, IndexError):
                continue  # not this layout
    return layouts


def load_weights(
    model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *, strict: bool = True
) -> LoadResult:
    """Load weights into ``model`` from a file path or a state_dict.

    The layout is recognised automatically: cnnlab's own, or torchvision's/timm's for that
    architecture (converted). With ``strict`` any missing, unexpected or mis-shaped key raises
    an error that names them; otherwise matching keys are loaded and the rest reported.
    """
    if isinstance(source, (str, os.PathLike)):
        state_dict = read_state_dict(source)
    elif isinstance(source, Mapping):
        state_dict = _unwrap(source, "the given mapping")
    else:
        raise CnnlabError(f"weights source must be a file path or a state_dict, got {type(source).__name__}")
    own = model.state_dict()
    layouts = _candidate_layouts(model, state_dict)
    layout, converted = max(layouts.items(), key=lambda kv: _score(kv[1], own))
    if hasattr(model, "filter_state_dict"):  # a model may drop keys it knows it does not need (GoogLeNet's aux heads)
        converted = model.filter_state_dict(converted)
    converted, adapted = adapt_input_channels(converted, own)
    result = LoadResult(
        layout=layout,
        adapted=adapted,
        missing=sorted(k for k in own if k not in converted),
        unexpected=sorted(k for k in converted if k not in own),
        mismatched=sorted(
            f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in converted.items()
            if k in own and own[k].shape != v.shape
        ),
    )
    if strict and not result.ok:
        raise CnnlabError(f"weights do not fit {getattr(model, 'model_name', type(model).__name__)} "
                          f"(read as {layout} layout):\n{_describe(result)}")
    loadable = {k: v for k, v in converted.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    return result


def adapt_input_channels(state_dict: StateDict, own: StateDict) -> tuple[StateDict, list[str]]:
    """Fit RGB first-layer conv weights to a model built for other input channels.

    One channel: the sum over RGB (a grey image through the RGB filters). C channels: the RGB
    filters repeated and scaled by 3/C, so activations keep their scale (the rule timm uses).
    """
    out, adapted = dict(state_dict), []
    for k, v in state_dict.items():
        target = own.get(k)
        if target is None or v.ndim != 4 or target.ndim != 4 or v.shape[1] != 3 or target.shape[1] == 3:
            continue
        if v.shape[0] != target.shape[0] or v.shape[2:] != target.shape[2:]:
            continue
        c = target.shape[1]
        if c == 1:
            out[k] = v.sum(1, keepdim=True)
        else:
            out[k] = v.repeat(1, (c + 2) // 3, 1, 1)[:, :c] * (3 / c)
        adapted.append(k)
    return out, adapted


def _describe(result: LoadResult, limit: int = 10) -> str:
    lines = []
    for label, keys in (("missing", result.missing), ("unexpected", result.unexpected), ("wrong shape", result.mismatched)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            lines.append(f"  {label} ({len(keys)}): {shown}")
    return "\n".join(lines)


def download_pretrained(info: ModelInfo, source: str) -> StateDict:
    """Fetch ``source``'s pretrained state_dict for ``info`` through that library's own downloader."""
    if source not in info.pretrained:
        have = ", ".join(info.pretrained) or "none"
        raise CnnlabError(f"{info.name} has no {source!r} pretrained weights (available: {have})")
    their_name = info.pretrained[source]
    try:
        if source == "torchvision":
            import torchvision

            weights = torchvision.models.get_model_weights(their_name).DEFAULT
            return weights.get_state_dict(progress=True, check_hash=True)
        if source == "timm":
            try:
                import timm
            except ImportError:
                raise CnnlabError("timm weights need the timm package: pip install timm") from None
            return timm.create_model(their_name, pretrained=True).state_dict()
    except CnnlabError:
        raise
    except Exception as e:  # URLError, OSError, hub errors: all mean "could not fetch"
        raise CnnlabError(
            f"could not download {source} weights {their_name!r} for {info.name}: {type(e).__name__}: {e}. "
            f"Pretrained weights need network access once (then {source} caches them). Offline, download "
            f"the file on another machine and pass its path: create_model({info.name!r}, weights='/path/to/file')"
        ) from None
    raise CnnlabError(f"unknown weights source {source!r}; use one of {', '.join(PRETRAINED_SOURCES)} or a file path")


def apply_weights(model: nn.Module, info: ModelInfo, weights: str | os.PathLike) -> LoadResult:
    """``create_model(..., weights=...)``: a source library name or a path."""
    if isinstance(weights, str) and weights in PRETRAINED_SOURCES:
        state_dict = download_pretrained(info, weights)
        convert = info.converter(weights)
        if convert is not None:
            state_dict = convert(dict(state_dict))
        return load_weights(model, state_dict)
    if isinstance(weights, (str, os.PathLike)) and (Path(weights).suffix or os.sep in str(weights)):
        return load_weights(model, weights)
    raise CnnlabError(f"weights={weights!r}: expected one of {', '.join(PRETRAINED_SOURCES)} or a path to a weights file")
