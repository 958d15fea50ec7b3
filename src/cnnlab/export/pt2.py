"""``torch.export`` programs saved as ``.pt2`` (the successor of TorchScript), checked by loading them back.

Also the parts every exporter shares: the example input, the dynamic axes (batch, and height/width where the
model allows them, tried and dropped with a note where it does not), refusing an existing path, comparing
outputs, and the result printed by ``cnnlab export``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.compress.fold import _tensors, probe_input

MIB = 2**20


@dataclass
class ExportResult:
    """One exported file. Args: path; format (``onnx``, ``pt2``); size_bytes on disk; opset (ONNX only);
    dynamic_axes: input name -> names of its dynamic axes; max_abs_diff between the file's and PyTorch's
    outputs on a fresh random input (None when not checked); tolerance it was held to; notes (axes kept fixed)."""

    path: Path
    format: str
    size_bytes: int
    opset: int | None = None
    dynamic_axes: dict[str, list[str]] = field(default_factory=dict)
    max_abs_diff: float | None = None
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        axes = "; ".join(f"{k}: {', '.join(v)}" for k, v in self.dynamic_axes.items() if v) or "none (static shapes)"
        lines = [f"wrote {self.path} ({self.format}, {self.size_bytes / MIB:.2f} MiB)"]
        if self.opset is not None:
            lines.append(f"opset: {self.opset}")
        lines.append(f"dynamic axes: {axes}")
        if self.max_abs_diff is not None:
            lines.append(f"max |difference| vs PyTorch: {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass
class Traced:
    """A model traced by torch.export. Args: program; example (the traced input); dynamic_axes; notes; module:
    what was traced (the model, or a detector wrapped as :class:`cnnlab.export.detection.OneImage`); detection:
    whether the outputs are a detector's (boxes, scores, labels), compared detection by detection."""

    program: torch.export.ExportedProgram
    example: Any
    dynamic_axes: dict[str, list[str]]
    notes: list[str]
    module: nn.Module | None = None
    detection: bool = False

    def check_input(self, dynamic_batch: bool) -> Any:
        """A fresh random input to compare the file with PyTorch on (a detector: another image in 0..1)."""
        if self.detection:
            return torch.rand_like(self.example)
        return check_example(self.example, dynamic_batch)

    def compare(self, reference: Any, outputs: list[torch.Tensor], atol: float, where: str, *, model: nn.Module,
                x: Any, notes: list[str]) -> tuple[float, float]:
        """(max |difference|, tolerance) of the file's ``outputs`` on ``x`` against PyTorch's ``reference``."""
        if self.detection:
            from cnnlab.export.detection import compare_detections

            return compare_detections(reference, outputs, atol, where)
        module = self.module or model
        return compare(reference, outputs, atol, where, rerun=lambda: rerun_outputs(module, x), notes=notes)


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as a Path, or a CnnlabError when it exists and ``overwrite`` is False (or it is a folder)."""
    path = Path(path)
    if path.is_dir():
        raise CnnlabError(f"{path} is a folder; expected the path of the file to write, e.g. {path / 'model.onnx'}")
    if path.exists() and not overwrite:
        raise CnnlabError(f"{path} already exists; pass overwrite=True (cnnlab export --force) to replace it")
    if not path.parent.is_dir():
        raise CnnlabError(f"cannot write {path}: the folder {path.parent} does not exist")
    return path


def trace(model: nn.Module, input_size: Any, *, dynamic_batch: bool, dynamic_size: bool | None) -> Traced:
    """``torch.export.export`` of ``model`` (in eval mode) with the dynamic axes asked for.

    ``dynamic_size=None`` tries dynamic height/width and keeps them fixed, with a note, where the model does not
    allow them (a Linear after a flatten, a fixed reshape); ``True`` makes that an error.
    """
    from cnnlab.export import detection

    if detection.is_detector(model):
        return _trace_detector(model, input_size, dynamic_size)
    batch = 2 if dynamic_batch else 1  # torch.export specialises a size-1 axis to 1, so trace batch 2
    example = probe_input(model, input_size, batch=batch, small=False)
    if isinstance(example, torch.Tensor) and not dynamic_batch and example.shape[0] != 1:
        example = example[:1]
    if isinstance(example, torch.Tensor) and dynamic_batch and example.shape[0] == 1:
        example = torch.cat([example, torch.randn_like(example)])
    notes: list[str] = []
    if dynamic_size is False:
        return Traced(_export(model, example, dynamic_batch, False), example, _axes(example, dynamic_batch, False),
                      notes)
    try:
        program = _export(model, example, dynamic_batch, True)
    except CnnlabError as e:
        if dynamic_size:
            raise CnnlabError(f"dynamic height/width: {e}; export with dynamic_size=False (fixed size)") from None
        notes.append(f"height and width are fixed at the traced size ({_describe_size(example)}): the model does "
                     f"not allow others ({str(e).splitlines()[0][:200]})")
        return Traced(_export(model, example, dynamic_batch, False), example, _axes(example, dynamic_batch, False),
                      notes)
    return Traced(program, example, _axes(example, dynamic_batch, True), notes)


def _trace_detector(model: nn.Module, input_size: Any, dynamic_size: bool | None) -> Traced:
    """A detector for one image of a fixed size: (C, H, W) -> (boxes, scores, labels); see cnnlab.export.detection."""
    from cnnlab.export import detection

    detection.check_exportable(model)
    if dynamic_size:
        raise CnnlabError("a detector exports at one fixed image size (its resize factor and anchor grid are computed "
                          "from the size while tracing); pass dynamic_size=None or False")
    image = detection.example_image(model, input_size)
    wrapped = detection.OneImage(model).eval()
    with detection.nms_may_keep_none():
        program = _export(wrapped, image, False, False)
    h, w = image.shape[-2:]
    note = (f"a detector exports for one image of {h}x{w} (input {detection.INPUT_NAME!r}, (C, H, W) in 0..1; "
            f"outputs {', '.join(detection.OUTPUT_NAMES)}): the batch and the size are fixed")
    return Traced(program, image, {detection.INPUT_NAME: []}, [note], module=wrapped, detection=True)


def _export(model: nn.Module, example: Any, dynamic_batch: bool, dynamic_size: bool) -> torch.export.ExportedProgram:
    D = torch.export.Dim.DYNAMIC
    if isinstance(example, torch.Tensor):
        spec: Any = {**({0: D} if dynamic_batch else {}), **({2: D, 3: D} if dynamic_size else {})}
    else:  # a list of CHW images: the list's length is part of the program's structure, each image's H, W may vary
        spec = [{1: D, 2: D} if dynamic_size else {} for _ in example]
    try:
        return torch.export.export(model, (example,), dynamic_shapes=(spec,))
    except CnnlabError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export's errors are many and long; keep the first line
        raise CnnlabError(f"torch.export cannot trace {type(model).__name__}: {type(e).__name__}: "
                          f"{_first_line(e)}") from None


def _axes(example: Any, dynamic_batch: bool, dynamic_size: bool) -> dict[str, list[str]]:
    if isinstance(example, torch.Tensor):
        return {"input": (["batch"] if dynamic_batch else []) + (["height", "width"] if dynamic_size else [])}
    return {f"image{i}": ["height", "width"] if dynamic_size else [] for i in range(len(example))}


def check_example(example: Any, dynamic_batch: bool) -> Any:
    """A fresh random input like ``example`` (batch 2 when the batch is dynamic) to compare the outputs on."""
    if isinstance(example, torch.Tensor):
        return torch.randn((2 if dynamic_batch else example.shape[0], *example.shape[1:]),
                           dtype=example.dtype, device=example.device)
    return [torch.rand_like(t) for t in example]


# A file whose outputs are within this factor of PyTorch float32's own error against float64 is as exact as float32
# allows: its rounding may differ from PyTorch's (other kernels, other summation orders) but not be much larger.
FLOAT32_ERROR_FACTOR = 2.0


def rerun_outputs(model: nn.Module, x: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``model``'s outputs on ``x`` computed again, in float32 and in float64 (on a copy): what tells float32
    rounding (the float64 run differs) from a model that does not repeat itself (the float32 rerun differs)."""
    import copy

    x64 = x.double() if isinstance(x, torch.Tensor) else [t.double() for t in x]
    with torch.no_grad():
        again = _tensors(model(x))
        return again, _tensors(copy.deepcopy(model).double()(x64))


def compare(reference: Any, outputs: list[torch.Tensor], atol: float, where: str, *,
            rerun: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None,
            notes: list[str] | None = None) -> tuple[float, float]:
    """(max |difference|, tolerance): ``atol`` scaled by the reference's magnitude (fp32 logits of order 100 carry
    errors 100x those of order 1); a different number or shape of outputs, or a difference above it, raises.

    Above it, when ``rerun`` gives the model's outputs again in float32 and in float64 (:func:`rerun_outputs`),
    the file still passes if its error against float64 is within FLOAT32_ERROR_FACTOR times PyTorch float32's
    own, and PyTorch repeats itself (its rerun within a tenth of that error): over a very deep network
    (preact_resnet1001's 1,001 layers) float32 rounding alone exceeds any fixed tolerance, and the export is not
    what is wrong. Its tolerance is then what that implies for the difference from PyTorch, (1 + factor) x
    PyTorch's own error, and a note in ``notes`` says so.
    """
    expected = _tensors(reference)
    again: list[torch.Tensor] | None = None
    exact: list[torch.Tensor] = []
    if len(expected) != len(outputs):
        raise CnnlabError(f"{where} returns {len(outputs)} outputs, PyTorch {len(expected)}")
    worst, tolerance = 0.0, atol
    for i, (e, o) in enumerate(zip(expected, outputs)):
        o = torch.as_tensor(o)
        if tuple(e.shape) != tuple(o.shape):
            raise CnnlabError(f"{where}: output {i} has shape {tuple(o.shape)}, PyTorch's {tuple(e.shape)}")
        if e.numel() == 0:
            continue
        e, o = e.detach().cpu().double(), o.detach().cpu().double()
        if not torch.isfinite(e).all():  # nothing to compare against: say so rather than "differs by nan"
            bad = int((~torch.isfinite(e)).sum())
            raise CnnlabError(f"PyTorch's own output {i} is not finite ({bad} of {e.numel()} values NaN or inf) on the "
                              f"random check input, so {where} cannot be verified and was not written: the model "
                              "overflows float32 as it stands (e.g. a very deep residual network at random init, whose "
                              "BatchNorm statistics are still mean 0, variance 1); load trained weights or calibrate "
                              "the BatchNorm statistics first, or pass check=False")
        diff = (e - o).abs().max().item()
        scale = max(1.0, e.abs().max().item())
        bound = atol * scale
        if not diff <= bound and rerun is not None and torch.isfinite(o).all() and again is None:
            try:
                again, exact = rerun()
            except Exception:  # noqa: BLE001 - a model that cannot run in float64 (int8, say): the plain tolerance
                again = []
        if not diff <= bound and exact:
            own, file_error = ((t - exact[i].cpu()).abs().max().item() for t in (e, o))
            repeat = (e - again[i].detach().cpu().double()).abs().max().item()
            if not repeat <= own / 10:  # what differs is not rounding: the model does not give the same output twice
                raise CnnlabError(f"{where} differs from PyTorch by {diff:.3g} on output {i} (largest |value| "
                                  f"{scale:.3g}); tolerance {bound:.3g}, and PyTorch itself gives outputs {repeat:.3g} "
                                  "apart on the same input (randomness in eval mode?): the file was not written")
            if file_error <= FLOAT32_ERROR_FACTOR * own:
                bound = (1 + FLOAT32_ERROR_FACTOR) * own
                if notes is not None:
                    notes.append(f"output {i} differs from PyTorch by {diff:.3g}, above {atol:g} x max(1, |output|) = "
                                 f"{atol * scale:.3g}, but PyTorch's own float32 error against float64 is {own:.3g} "
                                 f"and the file's {file_error:.3g} ({file_error / own:.2f}x): as exact as float32 "
                                 "allows here")
            else:
                raise CnnlabError(f"{where} differs from PyTorch by {diff:.3g} on output {i} (largest |value| "
                                  f"{scale:.3g}); tolerance {bound:.3g}, and its error against float64, "
                                  f"{file_error:.3g}, is {file_error / max(own, 1e-300):.3g}x PyTorch float32's own "
                                  f"({own:.3g}; at most {FLOAT32_ERROR_FACTOR:g}x passes): the file was not written")
        worst, tolerance = max(worst, diff), max(tolerance, bound)
        if not diff <= bound:  # NaN fails too
            raise CnnlabError(f"{where} differs from PyTorch by {diff:.3g} on output {i} (largest |value| "
                              f"{scale:.3g}); tolerance {bound:.3g}: the file was not written")
    return worst, tolerance


def to_pt2(model: nn.Module, path: str | os.PathLike, *, input_size: Any = None, dynamic_batch: bool = True,
           dynamic_size: bool | None = None, check: bool = True, atol: float = 1e-4,
           overwrite: bool = False, metadata: dict[str, str] | None = None) -> ExportResult:
    """Export ``model`` with ``torch.export`` to a ``.pt2`` file, load it back and compare it with PyTorch.

    ``input_size`` is (C, H, W) or an example input (default: a registered model's registry input). The batch
    is dynamic with ``dynamic_batch``; height/width with ``dynamic_size`` (None: where the model allows).
    ``check`` compares the loaded program with PyTorch (tolerance ``atol`` times max(1, largest |output|)).
    An existing ``path`` is refused unless ``overwrite``. The file appears only once it has passed the check
    (written to a temporary file beside it, then renamed). ``metadata`` is saved as ``extra_files``.
    """
    from cnnlab._io import atomic_write

    path = refuse_existing(path, overwrite)
    was_training = model.training
    model.eval()
    try:
        traced = trace(model, input_size, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
        result = ExportResult(path, "pt2", 0, dynamic_axes=traced.dynamic_axes, notes=traced.notes)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: torch.export.save wants a .pt2 name otherwise
                torch.export.save(traced.program, f, extra_files=dict(metadata or {}))
            if check:
                x = traced.check_input(dynamic_batch)
                with open(tmp, "rb") as f:
                    loaded = torch.export.load(f).module()
                with torch.no_grad():
                    reference, outputs = (traced.module or model)(x), loaded(x)
                result.max_abs_diff, result.tolerance = traced.compare(
                    reference, _tensors(outputs), atol, "the .pt2 program", model=model, x=x, notes=result.notes)

        atomic_write(path, write)
    finally:
        model.train(was_training)
    result.size_bytes = path.stat().st_size
    return result


def _describe_size(example: Any) -> str:
    shape = example.shape[-2:] if isinstance(example, torch.Tensor) else example[0].shape[-2:]
    return f"{shape[0]}x{shape[1]}"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""
