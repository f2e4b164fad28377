"""N-gram drafting (prompt lookup; transformers' PromptLookupCandidateGenerator, vLLM's ngram proposer): the host
proposes continuations of the longest context suffix that occurred before (dgopt/runtime/ngram_index.py); the step
is lookahead's verify branch alone, with no lookahead branch and no draft model, so it costs little more than an
autoregressive step.
Greedy with one guess: the candidate's length is read off its shape (length -1), so a step proposes as many tokens
as the match has (none: one position, an autoregressive step). Several guesses, or sampling (whose verifier draws
per depth from a fixed width), verify `guesses` x k tokens every step."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec
from .verify import add_verify

__all__ = ["expand_ngram", "varies"]


def varies(spec: Spec) -> bool:
    """The step verifies as many proposals as the match gave (one greedy guess): its length is -1."""
    return spec.sampling.kind == "greedy" and spec.strategy.guesses == 1


def expand_ngram(spec: Spec) -> Graph:
    g = Graph()
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    st = spec.strategy
    add_verify(g, past, st.guesses, -1 if varies(spec) else st.k, spec)
    return g
