"""CPU int8 post-training static quantisation: ONNX Runtime ``quantize_static`` and torchao's PT2E flow.

Both calibrate activation ranges on a few batches of real inputs (no training):

- :func:`quantize_onnx` takes an fp32 ``.onnx`` file (``cnnlab.export.to_onnx``), runs ORT's
  ``quant_pre_process`` (shape inference and graph optimisation, which quantisation needs) and
  ``quantize_static`` in QDQ format: int8 weights (per output channel), uint8 activations (the U8S8 pair ORT
  recommends for x86, whose VPMADDUBSW / VNNI kernels take unsigned activations), MinMax calibration by default.
- :func:`quantize_pt2e` takes an ``nn.Module``: ``torch.export`` -> ``prepare_pt2e`` with torchao's
  ``X86InductorQuantizer`` (its default config) -> calibration -> ``convert_pt2e`` -> ``torch.compile`` with
  Inductor's freezing on, which lowers the QDQ pattern to oneDNN int8 kernels (unlowered QDQ runs in fp32
  with extra quantise/dequantise ops and is slower than the fp32 model).

:func:`calibration_batches` gives batches of a run folder's training split, normalised like training and without
augmentation.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass
class QuantResult:
    """An int8 ONNX file: where it is, its size, the fp32 file's size, and notes on how it was made."""

    path: Path
    size_bytes: int
    fp32_size_bytes: int
    calibration_images: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.fp32_size_bytes / max(self.size_bytes, 1)

    def __str__(self) -> str:
        lines = [f"{self.path}: int8 ONNX (QDQ), {self.size_bytes / 1e6:.3f} MB, fp32 {self.fp32_size_bytes / 1e6:.3f} "
                 f"MB ({self.ratio:.2f}x smaller), calibrated on {self.calibration_images} images"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _as_batches(calibration: Any, name: str = "calibration") -> list[torch.Tensor]:
    """A tensor (N, C, H, W) or an iterable of them (or of (images, labels) pairs) -> list of float tensors."""
    if isinstance(calibration, torch.Tensor):
        batches = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    else:
        raise CnnlabError(f"{name}: expected a tensor (N, C, H, W) or an iterable of such batches, "
                          f"got {type(calibration).__name__}")
    if not batches:
        raise CnnlabError(f"{name}: no batches; expected at least one (N, C, H, W) tensor")
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dim() != 4 or len(b) == 0:
            what = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise CnnlabError(f"{name}: batch {i} is {what}; expected a non-empty (N, C, H, W) tensor")
        out.append(b.detach().float().cpu().contiguous())
    return out


def _check_shape(batches: list[torch.Tensor], expected: list[Any], name: str = "calibration") -> None:
    """``expected`` is the model input's shape, with None (or a name) for a dynamic axis; the batches must
    also agree with each other (a dynamic height/width is still one size per calibration set)."""
    labels = "NCHW"
    shown = tuple(e if isinstance(e, int) else labels[j] if j < 4 else "?" for j, e in enumerate(expected))
    first = tuple(batches[0].shape[1:])
    for i, b in enumerate(batches):
        if len(expected) != b.dim() or any(isinstance(e, int) and e != s for e, s in zip(expected[1:], b.shape[1:])):
            raise CnnlabError(f"{name}: batch {i} has shape {tuple(b.shape)}; the model expects {shown}")
        if tuple(b.shape[1:]) != first:
            raise CnnlabError(f"{name}: batch {i} has shape {tuple(b.shape)}, batch 0 {tuple(batches[0].shape)}; "
                              f"every batch must have the same (C, H, W) (the model expects {shown})")


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, calibration: Any, *, per_channel: bool = True,
                  overwrite: bool = False, method: str = "minmax", reduce_range: bool | None = None) -> QuantResult:
    """Quantise the fp32 ONNX file ``src`` to an int8 QDQ file ``dst``, calibrated on ``calibration``.

    Args:
        src: fp32 ``.onnx`` (one input of shape (N, C, H, W)).
        dst: the int8 file to write (atomically); refused if it exists unless ``overwrite``.
        calibration: a tensor (N, C, H, W) or an iterable of them (a DataLoader of (x, y) works too),
            normalised as the model's input; its C, H, W must match the model's.
        per_channel: one weight scale per output channel (else per tensor).
        method: ``minmax``, ``percentile`` (99.999th) or ``entropy`` calibration of the activation ranges.
        reduce_range: 7-bit weights, which ONNX Runtime's docs advise on x86 CPUs without VNNI (their u8 x s8
            kernels add pairs of products in int16 and 8-bit weights can saturate it); None: on when this CPU
            lacks VNNI (:func:`cnnlab._platform.int8_may_saturate`), noted in the result.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CnnlabError(f"{src}: no such ONNX file; export the model first (cnnlab.export.to_onnx)")
    if dst.exists() and not overwrite:
        raise CnnlabError(f"{dst} already exists; pass overwrite=True (--force) to replace it")
    if not dst.parent.is_dir():
        raise CnnlabError(f"cannot write {dst}: the folder {dst.parent} does not exist")
    if dst.resolve() == src.resolve():
        raise CnnlabError(f"{dst}: the int8 file must not replace its fp32 source")
    if method not in CALIBRATION_METHODS:
        raise CnnlabError(f"calibration method {method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
    model = onnx.load(str(src), load_external_data=False)
    if len(model.graph.input) != 1:
        raise CnnlabError(f"{src}: {len(model.graph.input)} inputs; quantize_onnx takes a model with one image input")
    inp = model.graph.input[0]
    expected = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in inp.type.tensor_type.shape.dim]
    batches = _as_batches(calibration)
    _check_shape(batches, expected)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {inp.name: b.numpy()}

        def rewind(self) -> None:
            self.it = iter(batches)

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    notes = [f"weights int8 {'per channel' if per_channel else 'per tensor'}, activations uint8, "
             f"{method} calibration, QDQ format (onnxruntime quantize_static after quant_pre_process)"]
    if reduce_range is None:
        from cnnlab._platform import int8_may_saturate

        reduce_range = int8_may_saturate()
        if reduce_range:
            notes.append("7-bit weights (reduce_range): this CPU has no VNNI, whose absence lets 8-bit weights "
                         "saturate ONNX Runtime's int16 pair sums")
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp_dir:
        pre = Path(tmp_dir) / "pre.onnx"
        tmp = Path(tmp_dir) / dst.name
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception as e:  # noqa: BLE001 - the optimiser can fail on unusual graphs; quantise unoptimised
            notes.append(f"quant_pre_process failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         "quantised the file as exported")
            pre = src
        try:
            quantize_static(str(pre), str(tmp), _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], reduce_range=reduce_range)
        except Exception as e:  # noqa: BLE001 - ORT raises plain exceptions; say which step failed
            raise CnnlabError(f"onnxruntime quantize_static failed on {src}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        os.replace(tmp, dst)
    return QuantResult(dst, dst.stat().st_size, src.stat().st_size, sum(len(b) for b in batches), notes)


class _Lowered(nn.Module):
    """A converted PT2E module compiled by Inductor with freezing on (the int8 lowering needs it)."""

    def __init__(self, converted: nn.Module) -> None:
        super().__init__()
        self.converted = converted
        # dynamic=False: one static graph per batch size; with a symbolic batch, Inductor 2.14.1's int8 conv
        # lowering asserted a channels-last stride on its uint8 output (seen on a trained fmnist_net)
        self.compiled = torch.compile(converted, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(x)


def quantize_pt2e(model: nn.Module, calibration: Any, *, input_size: Any = None, lower: bool = True) -> nn.Module:
    """int8 copy of ``model`` via torchao PT2E (X86InductorQuantizer, default symmetric config), lowered by
    ``torch.compile`` (``lower=False``: the unlowered QDQ module, for inspection; it is slower than fp32).

    ``calibration`` as for :func:`quantize_onnx`; ``input_size`` (C, H, W), if given, is checked against it.
    The batch stays dynamic. The first call compiles (seconds to minutes).
    """
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise CnnlabError(f"quantize_pt2e needs torchao (pip install 'cnnlab[compress]'): {e}") from None
    batches = _as_batches(calibration)
    if input_size is not None:
        _check_shape(batches, [None, *input_size])
    shape = tuple(batches[0].shape[1:])
    _check_shape(batches, [None, *shape])
    model = model.eval()
    example = batches[0][:2] if len(batches[0]) >= 2 else batches[0].repeat(2, 1, 1, 1)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for b in batches:
            prepared(b)
        converted = convert_pt2e(prepared)
    return _Lowered(converted) if lower else converted


def calibration_batches(run: Any, n_batches: int = 8, batch_size: int = 32) -> list[torch.Tensor]:
    """``n_batches`` batches of ``batch_size`` images from the training split of a run folder (a path or a
    :class:`cnnlab.engine.runs.LoadedRun`), normalised as in training and not augmented, on the CPU."""
    if n_batches < 1 or batch_size < 1:
        raise CnnlabError(f"calibration: n_batches and batch_size must be >= 1, got {n_batches} and {batch_size}")
    data = run_data(run)
    return list(_take(_images(data.train, batch_size, data), n_batches))


def run_data(run: Any) -> Any:
    """The data of a classification run (a path or a LoadedRun) as it was split and normalised for training, on
    the CPU, with the training split's augmentation off: what the model sees at test time."""
    from cnnlab.data.bundle import build_data
    from cnnlab.engine.runs import LoadedRun, load_run

    if not isinstance(run, LoadedRun):
        run = load_run(run)
    if run.task != "classification":
        raise CnnlabError(f"int8 calibration takes a classification run; this one is a {run.task} run")
    data = build_data(run.config.data, torch.device("cpu"), seed=run.config.seed, in_channels=run.input_shape[0])
    data.train.transform = None
    return data


def _images(loader: Any, batch_size: int, data: Any) -> Iterator[torch.Tensor]:
    """Batches of ``batch_size`` images out of ``loader``'s (x, y) batches, whatever their size."""
    buf: list[torch.Tensor] = []
    n = 0
    for x, _ in loader:
        buf.append(x.float().cpu().contiguous(memory_format=torch.contiguous_format))
        n += len(x)
        while n >= batch_size:
            cat = torch.cat(buf)
            yield cat[:batch_size]
            buf, n = [cat[batch_size:]], len(cat) - batch_size
    if n:
        yield torch.cat(buf)


def _take(it: Iterator[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
    for i, b in enumerate(it):
        if i >= n:
            return
        yield b


def save_pt2e(converted: nn.Module, path: str | os.PathLike, example: torch.Tensor, *, overwrite: bool = False,
              metadata: dict[str, str] | None = None) -> Path:
    """Save an unlowered PT2E module (``quantize_pt2e(..., lower=False)``) as a ``torch.export`` ``.pt2``
    program with a dynamic batch; ``torch.export.load(path).module()`` then ``torch.compile`` (freezing on)
    lowers it to int8 kernels where it is loaded. Written atomically; ``path`` existing refused unless overwrite."""
    from cnnlab._io import atomic_write

    path = Path(path)
    if path.exists() and not overwrite:
        raise CnnlabError(f"{path} already exists; pass overwrite=True (--force) to replace it")
    if isinstance(converted, _Lowered):
        converted = converted.converted
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(converted, (example,), dynamic_shapes=({0: batch},))
    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
