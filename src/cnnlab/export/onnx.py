"""ONNX export (torch.onnx's dynamo exporter), one self-contained file, checked in ONNX Runtime.

The model is traced once with ``torch.export`` (dynamic batch, height/width where the model allows: see
:func:`cnnlab.export.pt2.trace`), translated by ``torch.onnx.export(..., dynamo=True)`` and saved with its
weights inside the ``.onnx`` (torch's default writes them to a ``.onnx.data`` file beside it; protobuf caps a
single file at 2 GB, so only a model above that keeps the external file). The saved file is then run in
ONNX Runtime on a fresh random input and compared with PyTorch; it is moved into place only if it agrees.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.compress.fold import _tensors
from cnnlab.export.pt2 import ExportResult, refuse_existing, trace

MIN_OPSET = 18
PROTOBUF_LIMIT = 2 * 2**30  # bytes: a larger model keeps its weights in an external .onnx.data file


def to_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: Any = None, dynamic_batch: bool = True,
            dynamic_size: bool | None = None, opset: int = MIN_OPSET, check: bool = True, atol: float = 1e-4,
            overwrite: bool = False, metadata: dict[str, str] | None = None) -> ExportResult:
    """Export ``model`` to one ``.onnx`` file and verify it in ONNX Runtime.

    Args as for :func:`cnnlab.export.to_pt2`; ``opset`` >= 18. ``check`` runs the file in ONNX Runtime on a
    random input (batch 2 when the batch is dynamic) and raises a CnnlabError, leaving no file, when its
    outputs differ from PyTorch's by more than ``atol`` times ``max(1, largest |output|)``. ``metadata`` goes
    into the model's ``metadata_props`` (ONNX Runtime: ``session.get_modelmeta().custom_metadata_map``).
    """
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise CnnlabError(f"opset must be an integer >= {MIN_OPSET} (torch.onnx's dynamo exporter), got {opset!r}")
    if not atol > 0:
        raise CnnlabError(f"atol must be a positive tolerance, got {atol!r}")
    path = refuse_existing(path, overwrite)
    was_training = model.training
    model.eval()
    try:
        traced = trace(model, input_size, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
        names = {}
        if traced.detection:  # the graph's names: image -> boxes, scores, labels
            from cnnlab.export.detection import INPUT_NAME, OUTPUT_NAMES

            names = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES)}
        program = _translate(traced.program, traced.example, opset, **names)
        program.model.metadata_props.update({str(k): str(v) for k, v in (metadata or {}).items()})
        external = sum(t.numel() * t.element_size() for t in traced.program.state_dict.values()) > PROTOBUF_LIMIT
        result = ExportResult(path, "onnx", 0, opset=opset, dynamic_axes=_onnx_axes(program, traced.dynamic_axes),
                              notes=traced.notes)
        if external:
            result.notes.append(f"weights over {PROTOBUF_LIMIT / 2**30:.0f} GB: kept in {path.name}.data beside it")
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp_dir:
            tmp = Path(tmp_dir) / path.name  # the external data file, if any, is named after this name
            program.save(str(tmp), external_data=external)
            if check:
                x = traced.check_input(dynamic_batch)
                with torch.no_grad():
                    reference = (traced.module or model)(x)
                result.max_abs_diff, result.tolerance = traced.compare(
                    reference, run_onnx(tmp, x), atol, "the ONNX model", model=model, x=x, notes=result.notes)
            if external:
                shutil.move(str(tmp) + ".data", str(path) + ".data")
            os.replace(tmp, path)
    finally:
        model.train(was_training)
    result.size_bytes = path.stat().st_size
    return result


def run_onnx(path: str | os.PathLike, x: Any) -> list[torch.Tensor]:
    """The outputs of the ONNX file at ``path`` for input ``x`` (a tensor or a list of images), in ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch is allowed
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = [t.detach().cpu().numpy() for t in _tensors(x)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise CnnlabError(f"the ONNX model takes {len(names)} inputs, the example has {len(inputs)}")
    return [torch.from_numpy(o) for o in session.run(None, dict(zip(names, inputs)))]


def _translate(program: torch.export.ExportedProgram, example: Any, opset: int, **names: Any) -> Any:
    try:
        return torch.onnx.export(program, (example,), dynamo=True, opset_version=opset, verbose=False, **names)
    except Exception as e:  # noqa: BLE001 - name the op ONNX cannot express, the rest of the report is long
        text = _chain(e)
        found = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
        if found:
            raise CnnlabError(f"ONNX cannot express the op {found.group(1)}.{found.group(2)} (no ONNX function "
                              f"for it in opset {opset}); replace it in the model or export to pt2 instead") from None
        node = re.search(r"target=(torch\.ops\.[\w.]+)", text)
        what = f" at the op {node.group(1)}" if node else ""
        raise CnnlabError(f"torch.onnx could not translate the model{what}: {type(e).__name__}: "
                          f"{_summary(text)}") from None


def _onnx_axes(program: Any, traced_axes: dict[str, list[str]]) -> dict[str, list[str]]:
    """The dynamic axes as the ONNX graph names them: input name -> ['batch', 'height', 'width'] (traced names)."""
    graph = program.model.graph  # onnx_ir
    axes = {}
    for value, names in zip(graph.inputs, traced_axes.values()):
        axes[value.name] = names
    return axes


def _chain(e: BaseException) -> str:
    parts = []
    while e is not None:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _summary(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("-", "#"))]
    return (lines[0] if lines else "")[:300]
