"""Lookahead decoding (Fu et al. 2024, arXiv 2402.02057), Jacobi decoding, speculative decoding and UAG.

One step processes an x-block (the committed tokens whose KV is not cached yet: the prompt at prefill, then the last
accepted token) and, as -O0 expands it, runs two forwards over the same past:
  lookahead branch  [x-block, window]: the (N-1) x W Jacobi window; its argmax refreshes the window and yields n-grams
  verify branch     [x-block, G candidates of N-1 tokens from the n-gram pool]
`merge_forwards` turns them into one forward with a block mask. `verify_greedy` accepts the longest candidate prefix
that equals the model's own argmax chain plus one bonus token, so the output is the greedy output whatever the
candidates are. Sampling: `verify_sample_match` draws the token at each verified depth with a uniform shared by all
guesses and keeps the guess that equals the draws, so the output is distributed as token-by-token sampling.
Jacobi is the verify branch alone, its single candidate being the current guess block.
The host (dgopt/runtime/multitoken.py) keeps the window and pool, builds masks and positions, commits accepted KV."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec

__all__ = ["expand_lookahead", "expand_jacobi", "expand_speculative", "fuses_draft"]


def _branch_inputs(g: Graph, name: str):
    ids = g.add("input", attrs={"name": f"{name}_ids", "type": "tokens"}, id=f"{name}_ids")
    pos = g.add("input", attrs={"name": f"{name}_position_ids", "type": "positions"}, id=f"{name}_position_ids")
    mask = g.add("input", attrs={"name": f"{name}_mask", "type": "mask"}, id=f"{name}_mask")
    return ids, pos, mask


def _penalized(g: Graph, logits, cands, spec: Spec):
    """The verify forward's scores with the repetition penalty of every verified position (generate applies it at
    each step to the sequence so far: the committed tokens plus the candidate's own prefix)."""
    p = spec.sampling.repetition_penalty
    if p == 1.0:
        return logits
    return g.add("repetition_penalty_seq", [logits, _seen(g), cands], {"penalty": p}, id="verify/repetition_penalty")


def _seen(g: Graph):
    """The step's `seen` input (committed tokens per row), shared by the draft chain and the verifier."""
    return g.node("seen") if "seen" in g else g.add("input", attrs={"name": "seen", "type": "seen"}, id="seen")


def _verify(g: Graph, past, guesses: int, length: int, spec: Spec):
    ids, pos, mask = _branch_inputs(g, "verify")
    cands = g.add("input", attrs={"name": "candidates", "type": "candidates"}, id="candidates")
    fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="verify/target")
    logits = _penalized(g, fwd.out("logits"), cands, spec)
    shape = {"guesses": guesses, "length": length}
    if spec.sampling.kind == "sample":
        from .autoregressive import add_processors
        u = g.add("input", attrs={"name": "depth_uniform", "type": "uniform_seq"}, id="depth_uniform")
        tail = g.add("tail_positions", [logits], {"length": guesses * length}, id="verify/tail")
        x = add_processors(g, tail, spec.sampling.model_copy(update={"repetition_penalty": 1.0}), prefix="verify")
        probs = g.add("softmax", [x], id="verify/softmax")
        v = g.add("verify_sample_match", [probs, cands, u], shape, id="verify/accept")
    else:
        v = g.add("verify_greedy", [logits, cands], shape, id="verify/accept")
    g.set_output("accept_len", v.out("accept_len"))
    g.set_output("accept_tokens", v.out("tokens"))
    g.set_output("best", v.out("best"))
    g.set_output("present", fwd.out("kv"))


def expand_lookahead(spec: Spec) -> Graph:
    st = spec.strategy
    g = Graph()
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    if st.ngram > 1:
        ids, pos, mask = _branch_inputs(g, "lookahead")
        fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="lookahead/target")
        g.set_output("lookahead_tokens", g.add("argmax", [fwd.out("logits")], id="lookahead/argmax"))
    _verify(g, past, st.guesses, st.ngram - 1, spec)
    return g


def expand_jacobi(spec: Spec) -> Graph:
    g = Graph()
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    _verify(g, past, 1, spec.strategy.block, spec)
    return g


def fuses_draft(spec: Spec) -> bool:
    """Speculative decoding compiles draft and target into one step graph unless strategy.fused is off."""
    return spec.strategy.kind == "speculative" and spec.strategy.fused


def _fused_speculative(g: Graph, past, spec: Spec) -> Graph:
    """Draft chain and verification in ONE step graph: the draft (model "draft", its own cache draft_past) reads the
    committed tokens it has not seen yet and proposes d_1..d_k by k chained forwards; the target verifies
    [x-block, d_1..d_k] in one forward. One call per step instead of a draft call (k for a sampled draft) and a
    target call; the host still builds both models' masks and positions (they do not depend on the proposals'
    values) and commits both caches.
    Sampling: the draft's scores are restricted to the target's vocabulary, processed like the target's, and d_i is
    drawn from their softmax q_i by inverse CDF (noise input draft_uniform_i: q is computed for verification
    anyway, so Gumbel-max would only trade a [B] uniform for [B, V] noise); verify_sample gets q_1..q_k.
    k_schedule heuristic or a confidence threshold (greedy): the chain is one draft_loop node whose trip count, the
    step input draft_k, the host sets per step; verification reads the number of proposals off their shape (with a
    threshold the chain can stop early: the host's verify positions and mask, built for draft_k, are cut to it)."""
    from .autoregressive import add_draft_chain, add_processors
    k, sampled = spec.strategy.k, spec.sampling.kind == "sample"
    dpast = g.add("input", attrs={"name": "draft_past", "type": "kv"}, id="draft_past")
    d_ids, d_pos, d_mask = _branch_inputs(g, "draft")
    qs = []

    plain = spec.sampling.model_copy(update={"repetition_penalty": 1.0})   # the penalty is applied explicitly
    pen = spec.sampling.repetition_penalty
    seen = [_seen(g)] if pen != 1.0 else []

    def pick(last, i):
        # the draft proposes from the target's vocabulary and, with a penalty, penalises the committed tokens and
        # its own d_1..d_{i-1} as the target will: better agreement; any proposal keeps verification exact
        x = g.add("to_target_vocab", [last], id=f"draft{i}/to_target_vocab")
        if seen:
            x = g.add("repetition_penalty", [x, seen[-1]], {"penalty": pen}, id=f"draft{i}/repetition_penalty")
        if sampled:
            x = add_processors(g, x, plain, prefix=f"draft{i}")
            probs = g.add("softmax", [x], id=f"draft{i}/softmax")
            q = g.add("as_seq", [probs], id=f"draft{i}/q")
            qs.append(q if not qs else g.add("concat_seq", [qs[-1], q], id=f"draft{i}/q_seq"))
            u = g.add("input", attrs={"name": f"draft_uniform_{i}", "type": "uniform"}, id=f"draft_uniform_{i}")
            tok = g.add("multinomial", [probs, u], id=f"draft{i}/multinomial")
        else:
            tok = g.add("argmax", [x], id=f"draft{i}/argmax")
        if seen and i < k - 1:
            seen.append(g.add("mark_seen", [seen[-1], tok], id=f"draft{i}/mark_seen"))
        return tok

    loop = spec.strategy.draft_loop
    if loop:        # k varies per step (heuristic, or an early stop): the chain is a loop run up to draft_k times
        n = g.add("input", attrs={"name": "draft_k", "type": "trip_count"}, id="draft_k")
        chain = g.add("draft_loop", [d_ids, d_pos, d_mask, dpast, n] + seen,
                      {"k_max": spec.strategy.k_max if spec.strategy.k_schedule == "heuristic" else k,
                       "penalty": pen, "confidence": spec.strategy.confidence}, id="draft")
        props, dkv = chain.out("proposals"), chain.out("kv")
    else:
        props, dkv = add_draft_chain(g, d_ids, d_pos, d_mask, dpast, k, model="draft", pick=pick)
    cand = g.add("to_candidates", [props], id="draft/candidates")
    x = g.add("input", attrs={"name": "x_ids", "type": "tokens"}, id="x_ids")
    pos = g.add("input", attrs={"name": "verify_position_ids", "type": "positions"}, id="verify_position_ids")
    mask = g.add("input", attrs={"name": "verify_mask", "type": "mask"}, id="verify_mask")
    ids = g.add("concat_seq", [x, cand.out("ids")], id="verify_ids")
    if spec.strategy.confidence:    # the host built them for draft_k proposals: cut to the ones the draft gave
        trim = g.add("trim_block", [pos, mask, ids], id="verify/trim")
        pos, mask = trim.out("positions"), trim.out("mask")
    fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="verify/target")
    logits = _penalized(g, fwd.out("logits"), cand.out("candidates"), spec)
    if sampled:
        u = g.add("input", attrs={"name": "accept_uniform", "type": "uniform_seq"}, id="accept_uniform")
        tail = g.add("tail_positions", [logits], {"length": k}, id="verify/tail")
        px = add_processors(g, tail, plain, prefix="verify")
        v = g.add("verify_sample", [px, cand.out("candidates"), qs[-1], u], {"length": k}, id="verify/accept")
    else:
        length = -1 if loop else k                  # -1: the candidates' length, per step
        v = g.add("verify_greedy", [logits, cand.out("candidates")], {"guesses": 1, "length": length},
                  id="verify/accept")
    g.set_output("accept_len", v.out("accept_len"))
    g.set_output("accept_tokens", v.out("tokens"))
    g.set_output("best", v.out("best"))
    g.set_output("present", fwd.out("kv"))
    g.set_output("proposals", cand.out("ids"))
    g.set_output("draft_present", dkv)
    return g


def expand_speculative(spec: Spec) -> Graph:
    """The target's step: verify the draft's k proposals (one candidate of k tokens) after the x-block. Speculative
    (strategy.fused, the default) has the draft chain inside this graph; otherwise (fused false, and uag) the draft's
    own step graph is compiled beside it (draft.onnx): k chained greedy steps, or for speculative sampling its
    processed distribution, which verify_sample needs for rejection sampling. uag's re-tokenized proposals have no
    distribution over the target's vocabulary: sampled, they are matched against the target's draws."""
    g = Graph()
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    if fuses_draft(spec):
        return _fused_speculative(g, past, spec)
    if spec.sampling.kind == "greedy" or spec.strategy.kind == "uag":    # uag samples by matching draws
        # greedy uag: the re-tokenized proposals' count varies per step, and so does k with the heuristic
        # schedule: verify as many as the step has (length -1)
        varies = spec.sampling.kind == "greedy" and (spec.strategy.kind == "uag" or spec.strategy.draft_loop)
        _verify(g, past, 1, -1 if varies else spec.strategy.k, spec)
        return g
    from .autoregressive import add_processors
    K = spec.strategy.k
    ids, pos, mask = _branch_inputs(g, "verify")
    cands = g.add("input", attrs={"name": "candidates", "type": "candidates"}, id="candidates")
    q = g.add("input", attrs={"name": "draft_probs", "type": "probs_seq"}, id="draft_probs")
    u = g.add("input", attrs={"name": "accept_uniform", "type": "uniform_seq"}, id="accept_uniform")
    fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="verify/target")
    tail = g.add("tail_positions", [_penalized(g, fwd.out("logits"), cands, spec)], {"length": K}, id="verify/tail")
    x = add_processors(g, tail, spec.sampling.model_copy(update={"repetition_penalty": 1.0}), prefix="verify")
    v = g.add("verify_sample", [x, cands, q, u], {"length": K}, id="verify/accept")
    g.set_output("accept_len", v.out("accept_len"))
    g.set_output("accept_tokens", v.out("tokens"))
    g.set_output("best", v.out("best"))
    g.set_output("present", fwd.out("kv"))
    return g
