"""ONNX backend: lowering (lower.py: one rule per IR op, in forward.py, sampling.py, verification.py, draft.py);
the onnxruntime sessions live in dgopt.runtime."""
from .lower import LOWERINGS, OPSET, lower_to_onnx

__all__ = ["lower_to_onnx", "LOWERINGS", "OPSET"]
