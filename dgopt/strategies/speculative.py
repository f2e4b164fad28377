"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a draft proposes k tokens, the target verifies
them after the x-block in one forward. Fused (strategy.fused, the default): draft chain and verification in ONE step
graph, one call per step. Unfused: the draft's own step graph is compiled beside the target's (draft.onnx, from
draft_chain.py): k chained greedy steps, or for speculative sampling its processed distribution q, which
`verify_sample` needs for rejection sampling (accept with probability min(1, p/q), resample from
norm(max(0, p - q)))."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec
from .autoregressive import add_processors
from .draft_chain import add_fused_draft
from .verify import add_branch_inputs, add_penalized, add_verify, set_verify_outputs

__all__ = ["expand_speculative", "fuses_draft"]


def fuses_draft(spec: Spec) -> bool:
    """Speculative decoding compiles draft and target into one step graph unless strategy.fused is off."""
    return spec.strategy.kind == "speculative" and spec.strategy.fused


def _fused(g: Graph, past, spec: Spec) -> Graph:
    """The draft chain (draft_chain.add_fused_draft), then the target verifies [x-block, d_1..d_k] in one forward.
    The host still builds both models' masks and positions (they do not depend on the proposals' values) and
    commits both caches. With a confidence threshold the chain can stop early: the host's verify positions and
    mask, built for draft_k proposals, are cut to the ones the draft gave; verification reads the number of
    proposals off their shape."""
    k, sampled = spec.strategy.k, spec.sampling.kind == "sample"
    props, dkv, q = add_fused_draft(g, spec)
    cand = g.add("to_candidates", [props], id="draft/candidates")
    x = g.add("input", attrs={"name": "x_ids", "type": "tokens"}, id="x_ids")
    pos = g.add("input", attrs={"name": "verify_position_ids", "type": "positions"}, id="verify_position_ids")
    mask = g.add("input", attrs={"name": "verify_mask", "type": "mask"}, id="verify_mask")
    ids = g.add("concat_seq", [x, cand.out("ids")], id="verify_ids")
    if spec.strategy.confidence:
        trim = g.add("trim_block", [pos, mask, ids], id="verify/trim")
        pos, mask = trim.out("positions"), trim.out("mask")
    fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="verify/target")
    logits = add_penalized(g, fwd.out("logits"), cand.out("candidates"), spec)
    if sampled:
        plain = spec.sampling.model_copy(update={"repetition_penalty": 1.0})   # applied by add_penalized
        u = g.add("input", attrs={"name": "accept_uniform", "type": "uniform_seq"}, id="accept_uniform")
        tail = g.add("tail_positions", [logits], {"length": k}, id="verify/tail")
        px = add_processors(g, tail, plain, prefix="verify")
        v = g.add("verify_sample", [px, cand.out("candidates"), q, u], {"length": k}, id="verify/accept")
    else:
        length = -1 if spec.strategy.draft_loop else k      # -1: the candidates' length, per step
        v = g.add("verify_greedy", [logits, cand.out("candidates")], {"guesses": 1, "length": length},
                  id="verify/accept")
    set_verify_outputs(g, v, fwd)
    g.set_output("proposals", cand.out("ids"))
    g.set_output("draft_present", dkv)
    return g


def expand_speculative(spec: Spec) -> Graph:
    """The target's step: verify the draft's k proposals (one candidate of k tokens) after the x-block."""
    g = Graph()
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    if fuses_draft(spec):
        return _fused(g, past, spec)
    if spec.sampling.kind == "greedy":
        # with the heuristic schedule k varies per step: verify as many as the step has (length -1)
        add_verify(g, past, 1, -1 if spec.strategy.draft_loop else spec.strategy.k, spec)
        return g
    K = spec.strategy.k
    ids, pos, mask = add_branch_inputs(g, "verify")
    cands = g.add("input", attrs={"name": "candidates", "type": "candidates"}, id="candidates")
    q = g.add("input", attrs={"name": "draft_probs", "type": "probs_seq"}, id="draft_probs")
    u = g.add("input", attrs={"name": "accept_uniform", "type": "uniform_seq"}, id="accept_uniform")
    fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="verify/target")
    tail = g.add("tail_positions", [add_penalized(g, fwd.out("logits"), cands, spec)], {"length": K},
                 id="verify/tail")
    x = add_processors(g, tail, spec.sampling.model_copy(update={"repetition_penalty": 1.0}), prefix="verify")
    v = g.add("verify_sample", [x, cands, q, u], {"length": K}, id="verify/accept")
    set_verify_outputs(g, v, fwd)
    return g
