"""Lookahead decoding (Fu et al. 2024, arXiv 2402.02057). As -O0 expands it, one step runs two forwards over the
same past:
  lookahead branch  [x-block, window]: the (N-1) x W Jacobi window; its argmax refreshes the window and yields n-grams
  verify branch     [x-block, G candidates of N-1 tokens from the n-gram pool] (verify.py)
`merge_forwards` turns them into one forward with a block mask. The host keeps the window and the n-gram pool."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec
from .verify import add_branch_inputs, add_verify

__all__ = ["expand_lookahead"]


def expand_lookahead(spec: Spec) -> Graph:
    st = spec.strategy
    g = Graph()
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    if st.ngram > 1:
        ids, pos, mask = add_branch_inputs(g, "lookahead")
        fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="lookahead/target")
        g.set_output("lookahead_tokens", g.add("argmax", [fwd.out("logits")], id="lookahead/argmax"))
    add_verify(g, past, st.guesses, st.ngram - 1, spec)
    return g
