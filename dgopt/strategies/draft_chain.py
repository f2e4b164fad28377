"""A draft model's proposals, k chained forwards each over the token the one before chose, without round trips
through the host. Used by speculative (inside the target's step graph, `add_fused_draft`) and, as the draft's own
step graph (draft.onnx), by unfused speculative and uag (`expand_draft_chain`, `expand_draft_probs`)."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec
from .autoregressive import add_model_inputs, add_processors
from .verify import add_branch_inputs, add_seen

__all__ = ["add_draft_chain", "add_fused_draft", "expand_draft_chain", "expand_draft_probs"]


def add_draft_chain(g: Graph, ids, pos, mask, kv, k: int, model: str = "target", prefix: str = "draft",
                    pick=None):
    """k chained forwards of `model`, each over the token the one before chose (next_inputs). Returns the
    proposals [B, k] and the cache, which holds the fed block and d_1..d_{k-1}; d_k is never fed, as when the host
    calls a one-token step k times, but without k-1 round trips through the host.
    pick(last_logits, i) chooses d_i; default greedy (argmax)."""
    props = None
    for i in range(k):
        fwd = g.add("forward", [ids, pos, mask, kv], {"model": model}, id=f"{prefix}{i}")
        last = g.add("last_position", [fwd.out("logits")], id=f"{prefix}{i}/last_position")
        tok = pick(last, i) if pick else g.add("argmax", [last], id=f"{prefix}{i}/argmax")
        nxt = g.add("next_inputs", [tok, pos, mask], id=f"{prefix}{i}/next")
        ids, pos, mask, kv = nxt.out("ids"), nxt.out("positions"), nxt.out("mask"), fwd.out("kv")
        props = ids if props is None else g.add("concat_seq", [props, ids], id=f"{prefix}{i}/proposals")
    return props, kv


def add_fused_draft(g: Graph, spec: Spec):
    """The draft (model "draft", its own cache draft_past) inside the target's step graph: it reads the committed
    tokens it has not seen yet (draft_ids) and proposes d_1..d_k by k chained forwards. Returns the proposals
    [B, k], the draft's cache, and for sampling the draft's distributions q_1..q_k (else None).
    Sampling: the draft's scores are restricted to the target's vocabulary, processed like the target's, and d_i is
    drawn from their softmax q_i by inverse CDF (noise input draft_uniform_i: q is computed for verification
    anyway, so Gumbel-max would only trade a [B] uniform for [B, V] noise).
    k_schedule heuristic or a confidence threshold (greedy): the chain is one draft_loop node whose trip count, the
    step input draft_k, the host sets per step."""
    k, sampled = spec.strategy.k, spec.sampling.kind == "sample"
    dpast = g.add("input", attrs={"name": "draft_past", "type": "kv"}, id="draft_past")
    d_ids, d_pos, d_mask = add_branch_inputs(g, "draft")
    qs = []

    plain = spec.sampling.model_copy(update={"repetition_penalty": 1.0})   # the penalty is applied explicitly
    pen = spec.sampling.repetition_penalty
    seen = [add_seen(g)] if pen != 1.0 else []

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

    if spec.strategy.draft_loop:    # k varies per step (heuristic, or an early stop): a loop run up to draft_k times
        n = g.add("input", attrs={"name": "draft_k", "type": "trip_count"}, id="draft_k")
        chain = g.add("draft_loop", [d_ids, d_pos, d_mask, dpast, n] + seen,
                      {"k_max": spec.strategy.k_max if spec.strategy.k_schedule == "heuristic" else k,
                       "penalty": pen, "confidence": spec.strategy.confidence}, id="draft")
        return chain.out("proposals"), chain.out("kv"), None
    props, dkv = add_draft_chain(g, d_ids, d_pos, d_mask, dpast, k, model="draft", pick=pick)
    return props, dkv, (qs[-1] if qs else None)


def expand_draft_chain(spec: Spec, k: int, loop: bool = False, confidence: float = 0.0) -> Graph:
    """A greedy draft's own step that proposes k tokens in ONE call (draft.onnx beside the target's step); `loop`:
    as many as its input draft_k says, up to k (a draft_loop: k_schedule heuristic), fewer where the draft's
    confidence in a proposal falls below `confidence`."""
    g = Graph()
    ids, pos, mask, past = add_model_inputs(g)
    if loop:
        n = g.add("input", attrs={"name": "draft_k", "type": "trip_count"}, id="draft_k")
        chain = g.add("draft_loop", [ids, pos, mask, past, n],
                      {"model": "target", "k_max": k, "confidence": confidence}, id="draft")
        props, kv = chain.out("proposals"), chain.out("kv")
    else:
        props, kv = add_draft_chain(g, ids, pos, mask, past, k)
    g.set_output("proposals", props)
    g.set_output("present", kv)
    return g


def expand_draft_probs(spec: Spec) -> Graph:
    """A draft's step for speculative sampling: its processed distribution q for the next token. The host draws the
    proposal from q and hands q to the target's verify_sample."""
    g = Graph()
    ids, pos, mask, past = add_model_inputs(g)
    fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="target")
    last = g.add("last_position", [fwd.out("logits")], id="last_position")
    g.set_output("probs", g.add("softmax", [add_processors(g, last, spec.sampling)], id="sampler/softmax"))
    g.set_output("present", fwd.out("kv"))
    return g
