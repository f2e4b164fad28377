"""The verify branch every multi-token strategy ends in: the target's forward over [x-block, candidates] and the
acceptance op (`verify_greedy`, or `verify_sample_match` for sampling), plus the step inputs it shares with the
draft chain. The x-block is the committed tokens whose KV is not cached yet (the prompt at prefill, then the last
accepted token); the host builds its masks and positions and commits the accepted KV."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec
from .autoregressive import add_processors

__all__ = ["add_branch_inputs", "add_seen", "add_penalized", "add_verify", "set_verify_outputs"]


def add_branch_inputs(g: Graph, name: str):
    ids = g.add("input", attrs={"name": f"{name}_ids", "type": "tokens"}, id=f"{name}_ids")
    pos = g.add("input", attrs={"name": f"{name}_position_ids", "type": "positions"}, id=f"{name}_position_ids")
    mask = g.add("input", attrs={"name": f"{name}_mask", "type": "mask"}, id=f"{name}_mask")
    return ids, pos, mask


def add_seen(g: Graph):
    """The step's `seen` input (committed tokens per row), shared by the draft chain and the verifier."""
    return g.node("seen") if "seen" in g else g.add("input", attrs={"name": "seen", "type": "seen"}, id="seen")


def add_penalized(g: Graph, logits, cands, spec: Spec):
    """The verify forward's scores with the repetition penalty of every verified position (generate applies it at
    each step to the sequence so far: the committed tokens plus the candidate's own prefix)."""
    p = spec.sampling.repetition_penalty
    if p == 1.0:
        return logits
    return g.add("repetition_penalty_seq", [logits, add_seen(g), cands], {"penalty": p},
                 id="verify/repetition_penalty")


def add_verify(g: Graph, past, guesses: int, length: int, spec: Spec) -> None:
    """Verify `guesses` candidates of `length` tokens (-1: as many as the step's candidates have) after the x-block.
    Greedy: `verify_greedy` accepts the longest candidate prefix equal to the model's own argmax chain plus one
    bonus token, so the output is the greedy output whatever the candidates are. Sampling: `verify_sample_match`
    draws the token at each verified depth with a uniform shared by all guesses and keeps the guess that equals the
    draws, so the output is distributed as token-by-token sampling."""
    ids, pos, mask = add_branch_inputs(g, "verify")
    cands = g.add("input", attrs={"name": "candidates", "type": "candidates"}, id="candidates")
    fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="verify/target")
    logits = add_penalized(g, fwd.out("logits"), cands, spec)
    shape = {"guesses": guesses, "length": length}
    if spec.sampling.kind == "sample":
        u = g.add("input", attrs={"name": "depth_uniform", "type": "uniform_seq"}, id="depth_uniform")
        tail = g.add("tail_positions", [logits], {"length": guesses * length}, id="verify/tail")
        x = add_processors(g, tail, spec.sampling.model_copy(update={"repetition_penalty": 1.0}), prefix="verify")
        probs = g.add("softmax", [x], id="verify/softmax")
        v = g.add("verify_sample_match", [probs, cands, u], shape, id="verify/accept")
    else:
        v = g.add("verify_greedy", [logits, cands], shape, id="verify/accept")
    set_verify_outputs(g, v, fwd)


def set_verify_outputs(g: Graph, accept, fwd) -> None:
    """The outputs every verifying step has: what was accepted, which candidate, and the target's cache."""
    g.set_output("accept_len", accept.out("accept_len"))
    g.set_output("accept_tokens", accept.out("tokens"))
    g.set_output("best", accept.out("best"))
    g.set_output("present", fwd.out("kv"))
