"""Export for deployment: ONNX (checked in ONNX Runtime) and torch.export ``.pt2``. Works on any nn.Module."""
from cnnlab.export.onnx import run_onnx, to_onnx
from cnnlab.export.pt2 import ExportResult, to_pt2

__all__ = ["ExportResult", "run_onnx", "to_onnx", "to_pt2"]
