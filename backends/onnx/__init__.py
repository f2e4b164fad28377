"""ONNX backend: lowering (lower.py) and onnxruntime sessions (live in dgopt.runtime)."""
from .lower import LOWERINGS, OPSET, lower_to_onnx

__all__ = ["lower_to_onnx", "LOWERINGS", "OPSET"]
