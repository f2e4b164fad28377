"""Lower an optimised IR step graph to ONE ONNX graph: inlined model forward(s) + logits processors + sampler (+ the
draft chain and verification of a multi-token strategy). The builder (builder.py) walks the graph; each IR op has one
lowering rule, in the module for what it does: forward.py (the model forward and its inputs), sampling.py
(processors and samplers), verification.py (acceptance), draft.py (a draft's chain and its loop)."""
from __future__ import annotations

import onnx

from dgopt.errors import BackendError
from dgopt.ir import Graph

from . import draft, forward, sampling, verification
from .builder import OPSET, Builder

__all__ = ["lower_to_onnx", "OPSET", "LOWERINGS"]

LOWERINGS = {**forward.RULES, **sampling.RULES, **verification.RULES, **draft.RULES}


def lower_to_onnx(g: Graph, forwards: dict, vocab_size: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """Returns (model, io) where io lists the step's inputs/outputs by role for the manifest."""
    if vocab_size is None and "target" in forwards:
        vocab_size = forwards["target"][1]["vocab_size"]
    b = Builder(g, forwards, vocab_size, LOWERINGS)
    model = b.build()
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        raise BackendError(f"onnx backend: lowered graph is invalid: {str(e).splitlines()[0]}") from None
    return model, b.io
