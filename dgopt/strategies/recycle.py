"""RecycleGPT (arXiv 2308.03421) in EAGLE's lossless form (arXiv 2401.15077): a small recyclable module drafts from
the target's own last hidden state, and the target verifies its proposals.

One step graph, one call per step (verify: true):
  verify   the target's forward over [x-block, d_1..d_k] (d: the proposals the previous step's chain made, fed back
           as the input `candidates`), which also yields its post-norm hidden states; verify_greedy accepts the
           longest prefix of d equal to the target's argmax chain, plus the bonus token: token-identical to greedy
           decoding whatever d is.
  chain    accepted_hidden picks the hidden state of each row's last accepted position and the bonus token; k
           recycle_step nodes then propose d'_1..d'_k (each reads the hidden state the step before predicted and
           the token it chose), the next step's candidates (output `proposals`).
At prefill there are no proposals yet: the host feeds k tokens drawn from the prompt; verification rejects them or
accepts them exactly like any others.
-O0 writes the chain in the textbook form (softmax then argmax at each step); the passes remove the softmaxes and
fuse the greedy chain into one recycle_chain node (fuse_recycle_chain).

k_schedule heuristic (greedy): the chain is one recycle_loop node whose trip count next_chain_length computes in
the step from the step's own acceptance (transformers' heuristic, as speculative's: K + 2 after a step whose every
row accepted all K proposals, else K - 1, within 1..draft_k, the input the host sets to k_max); verification reads
K off the candidates' shape. Decided in the graph, the length answers the acceptance just computed: the host
could only answer the step before's (a step's chain runs before the host sees its acceptance).

verify: false (RecycleGPT's own mode, LOSSY): accept_unverified commits the module's k proposals unverified and
the target's token after them (k + 1 tokens per forward; the input `trusted` is 0 at prefill, when the guesses come
from the prompt, then k). Greedy only. Its output is not the target's: benchmarks/recycle_lossy.py measures the
agreement and the perplexity.

Sampling (exact in distribution): the chain draws d'_i from the module's processed distribution q_i (the target's
logits processors, inverse CDF with the input draft_uniform_i) and outputs q as `proposal_probs`; the next step's
verify_sample accepts d_i with probability min(1, p_i(d_i) / q_i(d_i)) and draws a rejected position from
norm(max(0, p - q)), as speculative sampling does. The prefill's guesses come with point-mass q (one-hot)."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec
from .autoregressive import add_processors
from .verify import add_branch_inputs, add_penalized, set_verify_outputs

__all__ = ["expand_recycle"]


def expand_recycle(spec: Spec) -> Graph:
    k = spec.strategy.k
    adaptive = spec.strategy.k_schedule == "heuristic"
    g = Graph()
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    ids, pos, mask = add_branch_inputs(g, "verify")
    cands = g.add("input", attrs={"name": "candidates", "type": "candidates"}, id="candidates")
    fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="verify/target")
    logits = add_penalized(g, fwd.out("logits"), cands, spec)
    sampled = spec.sampling.kind == "sample"
    plain = spec.sampling.model_copy(update={"repetition_penalty": 1.0})   # the penalty is applied explicitly
    if sampled:
        q = g.add("input", attrs={"name": "draft_probs", "type": "probs_seq"}, id="draft_probs")
        u = g.add("input", attrs={"name": "accept_uniform", "type": "uniform_seq"}, id="accept_uniform")
        tail = g.add("tail_positions", [logits], {"length": k}, id="verify/tail")
        x = add_processors(g, tail, plain, prefix="verify")
        v = g.add("verify_sample", [x, cands, q, u], {"length": k}, id="verify/accept")
    else:
        v = g.add("verify_greedy", [logits, cands], {"guesses": 1, "length": -1 if adaptive else k},
                  id="verify/accept")
    if not spec.strategy.verify:    # LOSSY: the module's proposals are committed unverified (from the second step)
        trusted = g.add("input", attrs={"name": "trusted", "type": "count"}, id="trusted")
        v = g.add("accept_unverified", [v.out("tokens"), v.out("accept_len"), cands, trusted],
                  id="verify/unverified")
    start = g.add("accepted_hidden", [fwd.out("hidden"), v.out("accept_len"), v.out("tokens")],
                  {"length": -1 if adaptive else k}, id="recycle/start")
    h, tok, props, qs = start.out("hidden"), start.out("token"), None, None
    if adaptive:
        cap = g.add("input", attrs={"name": "draft_k", "type": "trip_count"}, id="draft_k")
        active = g.add("input", attrs={"name": "active_rows", "type": "count"}, id="active_rows")
        n = g.add("next_chain_length", [v.out("accept_len"), cands, cap, active], id="recycle/next_k")
        props = g.add("recycle_loop", [h, tok, n], {"module": "recycle"}, id="recycle/loop")
    for i in range(0 if adaptive else k):
        st = g.add("recycle_step", [h, tok], {"module": "recycle"}, id=f"recycle{i}")
        if sampled:
            x = add_processors(g, st.out("logits"), plain, prefix=f"recycle{i}")
            probs = g.add("softmax", [x], id=f"recycle{i}/softmax")
            du = g.add("input", attrs={"name": f"draft_uniform_{i}", "type": "uniform"}, id=f"draft_uniform_{i}")
            tok = g.add("multinomial", [probs, du], id=f"recycle{i}/multinomial")
            qi = g.add("as_seq", [probs], id=f"recycle{i}/q")
            qs = qi if qs is None else g.add("concat_seq", [qs, qi], id=f"recycle{i}/q_seq")
        else:
            probs = g.add("softmax", [st.out("logits")], id=f"recycle{i}/softmax")
            tok = g.add("argmax", [probs], id=f"recycle{i}/argmax")
        h = st.out("hidden")
        seq = g.add("as_seq", [tok], id=f"recycle{i}/as_seq")
        props = seq if props is None else g.add("concat_seq", [props, seq], id=f"recycle{i}/proposals")
    set_verify_outputs(g, v, fwd)
    g.set_output("proposals", props)
    if sampled:
        g.set_output("proposal_probs", qs)
    return g
