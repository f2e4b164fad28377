"""Jacobi decoding: the verify branch alone, its single candidate being the current guess block of
`strategy.block` tokens, which the host refreshes from the model's own outputs each step."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec
from .verify import add_verify

__all__ = ["expand_jacobi"]


def expand_jacobi(spec: Spec) -> Graph:
    g = Graph()
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    add_verify(g, past, 1, spec.strategy.block, spec)
    return g
