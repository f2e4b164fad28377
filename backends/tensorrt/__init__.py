"""TensorRT backend: a static compatibility check of the lowered step graph (no TensorRT needed), an engine build
from an artifact's step.onnx, and a CUDA session over the engine.

`import dgopt.backends.tensorrt` works everywhere: `tensorrt` (and CUDA) are imported only by `build_engine`,
`TrtSession` and `check_engine_compat`, which raise `dgopt.errors.BackendError` when TensorRT is missing."""
from __future__ import annotations

from .build import build_engine, graph_precision, timing_cache_path
from .profile import dim_ranges, profile_shapes, step_widths
from .check import Finding, check_artifact, check_onnx, format_op_table, format_report, op_inventory
from .session import TrtSession, check_engine_compat
from .support import MATRIX, TOPK_MAX_K, TRT_MATRIX_VERSION, OpSupport, lookup

__all__ = ["check_onnx", "check_artifact", "Finding", "format_report", "format_op_table", "op_inventory",
           "build_engine", "profile_shapes", "dim_ranges", "step_widths", "graph_precision", "timing_cache_path",
           "TrtSession", "check_engine_compat", "is_available", "MATRIX",
           "OpSupport", "lookup", "TOPK_MAX_K", "TRT_MATRIX_VERSION"]


def is_available() -> bool:
    """True when TensorRT imports and torch sees a CUDA device (what building and running an engine need)."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (e.g. missing libnvinfer) is "not available" too
        return False
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False
