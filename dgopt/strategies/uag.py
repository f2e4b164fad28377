"""UAG (universal assisted generation): a draft with its own tokenizer proposes text; the host re-tokenizes it into
target tokens, which the target verifies as one candidate. The draft runs its own step graph (draft.onnx, built by
draft_chain.expand_draft_chain). Re-tokenized proposals have no distribution over the target's vocabulary, so
sampled, they are matched against the target's draws (verify_sample_match)."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec
from .verify import add_verify

__all__ = ["expand_uag"]


def expand_uag(spec: Spec) -> Graph:
    """The target's step. Greedy: the re-tokenized proposals' count varies per step, so verify as many as the step
    has (length -1); sampled: a fixed width of k."""
    g = Graph()
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    add_verify(g, past, 1, -1 if spec.sampling.kind == "greedy" else spec.strategy.k, spec)
    return g
