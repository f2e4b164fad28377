"""Torch eager interpreter of the IR: the oracle. Logits processors call Hugging Face's own warpers, so comparing a
lowered graph with this interpreter compares it with `generate`'s semantics."""
from __future__ import annotations

import torch

from dgopt.errors import BackendError
from dgopt.ir import Graph

__all__ = ["run_graph", "exact_probs"]


def _hf(cls_name: str, *args, **kw):
    import transformers
    return getattr(transformers, cls_name)(*args, **kw)


def _forward(node, ins, models, hidden: bool = False):
    """hidden: also the LM head's input (after the final norm), from the decoder body, the head applied to it."""
    from transformers import DynamicCache
    ids, pos, mask, past = ins
    lm = models[node.attrs["model"]]
    cache = DynamicCache(config=lm.model.config)
    for i in range(0, len(past), 2):
        cache.update(past[i], past[i + 1], i // 2)
    kw = dict(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
    with torch.no_grad():
        if hidden:
            kw["cache"] = kw.pop("past_key_values")     # the decoder body's name for it
            out = lm.model.get_decoder()(**kw)
            h = out.last_hidden_state
            res = {"logits": lm.model.get_output_embeddings()(h), "hidden": h}
        else:
            out = lm.model(**kw)
            res = {"logits": out.logits}
    kv = []
    for layer in out.past_key_values.layers[:lm.info["num_layers"]]:
        kv += [layer.keys, layer.values]
    return {**res, "kv": kv}


def _accepted_hidden(node, ins):
    hidden, alen, tokens = ins
    B, T = hidden.shape[:2]
    m = alen - 1
    rows = torch.arange(B)
    return {"hidden": hidden[rows, T - tokens.shape[1] + m], "token": tokens[rows, m]}


def _accept_unverified(node, ins):
    tokens, alen, cands, trusted = ins
    d = torch.cat([cands[:, 0], tokens[:, -1:]], 1)
    take = torch.arange(tokens.shape[1])[None] < trusted[:, None]
    return {"tokens": torch.where(take, d, tokens), "accept_len": torch.maximum(alen, trusted + 1),
            "best": alen * 0}


def _recycle_step(node, ins, models):
    """models[module]: {"module": the RecycleModule, "frozen": dgopt.models.recycle.Frozen(target), "vocab": the
    draft vocabulary or None}."""
    r = models[node.attrs["module"]]
    with torch.no_grad():
        h, logits = r["frozen"].step(r["module"], ins[0], ins[1])
    if r.get("vocab") is not None:      # tokens outside the draft vocabulary at the float minimum
        keep = torch.full_like(logits, torch.finfo(logits.dtype).min)
        idx = torch.tensor(r["vocab"])
        keep[:, idx] = logits[:, idx]
        logits = keep
    return {"hidden": h, "logits": logits}


def _rep(node, ins):
    x, seen = ins
    p = node.attrs["penalty"]
    pen = torch.where(x > 0, x / p, x * p)
    return torch.where(seen.bool(), pen, x)


def _rep_seq(node, ins):
    x, seen, cands = ins
    B, G, K = cands.shape
    hot = torch.nn.functional.one_hot(cands, x.shape[-1]).float().cumsum(2).reshape(B, G * K, x.shape[-1])
    s = torch.cat([torch.zeros_like(seen)[:, None], hot], 1) + seen[:, None]
    n = G * K + 1
    tail = x[:, -n:]
    return torch.cat([x[:, :-n], torch.where(s > 0, torch.where(tail > 0, tail / node.attrs["penalty"],
                                                                 tail * node.attrs["penalty"]), tail)], 1)


def _multinomial(node, ins):
    probs, u = ins
    cdf = probs.cumsum(-1)
    thr = u[:, None] * cdf[:, -1:]
    return (cdf <= thr).sum(-1).clamp(max=probs.shape[-1] - 1)


def _sample_top_k(node, ins):
    x, u = ins
    vals, idx = torch.topk(x, min(node.attrs["k"], x.shape[-1]), -1)
    sm = torch.softmax(vals / node.attrs["temperature"], -1)
    cdf = sm.cumsum(-1)
    j = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=sm.shape[-1] - 1)
    return {"token": idx.gather(-1, j)[:, 0], "probs": torch.zeros_like(x).scatter(-1, idx, sm)}


def _verify_greedy(node, ins):
    logits, cands = ins
    G, K = node.attrs["guesses"], node.attrs["length"]
    if K == -1:         # one candidate, its length from its shape
        G, K = 1, cands.shape[2]
    am = logits.argmax(-1)
    nc = G * K
    if nc == 0:
        ox = am[:, -1:]
        return {"tokens": ox, "accept_len": torch.ones_like(ox[:, 0]), "best": torch.zeros_like(ox[:, 0])}
    ox = am[:, -(nc + 1):-nc]
    pred = torch.cat([ox[:, None, :].expand(-1, G, 1), am[:, -nc:].reshape(-1, G, K)], 2)
    matched = (cands == pred[:, :, :K]).long().cumprod(2).sum(2)
    best = matched.argmax(1)          # torch returns the first maximal index on CPU
    return {"tokens": pred[torch.arange(len(best)), best], "accept_len": matched.max(1).values + 1, "best": best}


def _verify_sample_match(node, ins):
    probs, cands, u = ins
    G, K = node.attrs["guesses"], node.attrs["length"]
    p = probs.reshape(-1, 1 + G * K, probs.shape[-1])
    u_d = u[:, [0] + list(range(1, K + 1)) * G]
    cdf = p.cumsum(-1)
    drawn = (cdf <= u_d[..., None] * cdf[..., -1:]).sum(-1).clamp(max=p.shape[-1] - 1)
    return _verify_greedy(node, [torch.nn.functional.one_hot(drawn, p.shape[-1]).float(), cands])


def _verify_sample(node, ins):
    x, cands, q, u_all = ins
    K = node.attrs["length"]
    u, u_res = u_all[:, :K], u_all[:, K:]
    p = torch.softmax(x, -1).reshape(-1, K + 1, x.shape[-1])
    d = cands.reshape(-1, K)
    p_d = p[:, :K].gather(2, d[..., None])[..., 0]
    q_d = q.gather(2, d[..., None])[..., 0]
    rejected = ~(u * q_d < p_d)
    n = torch.cat([rejected, torch.ones_like(rejected[:, :1])], 1).long().argmax(1)
    resid = (p - torch.cat([q, torch.zeros_like(q[:, :1])], 1)).clamp(min=0)
    r_n = resid[torch.arange(len(n)), n]
    r_n = r_n + (r_n.sum(-1, keepdim=True) <= 0).float() * p[torch.arange(len(n)), n]
    cdf = r_n.cumsum(-1)
    t = (cdf <= u_res * cdf[:, -1:]).sum(-1).clamp(max=cdf.shape[-1] - 1)
    tokens = torch.cat([d, torch.zeros_like(d[:, :1])], 1)
    tokens[torch.arange(len(n)), n] = t
    return {"tokens": tokens, "accept_len": n + 1, "best": torch.zeros_like(n)}


def _merge_masks(node, ins):
    a, b = ins
    qa, qb = a.shape[2], b.shape[2]
    past = a.shape[3] - qa
    fill = torch.finfo(torch.float32).min
    ab = torch.full((a.shape[0], 1, qa, qb), fill)
    ba = torch.full((a.shape[0], 1, qb, qa), fill)
    return torch.cat([torch.cat([a[..., :past], a[..., past:], ab], 3), torch.cat([b[..., :past], ba, b[..., past:]], 3)], 2)


def _split_kv(node, ins):
    kv, first, second = ins
    qa, qb = first.shape[1], second.shape[1]
    past = kv[0].shape[2] - qa - qb
    return {"head": [t[:, :, :past + qa] for t in kv],
            "tail": [torch.cat([t[:, :, :past], t[:, :, past + qa:]], 2) for t in kv]}


def _trim_block(node, ins):
    pos, mask, ids = ins
    q, cut = ids.shape[1], mask.shape[2] - ids.shape[1]        # cut: the block's tokens past q'
    return {"positions": pos[:, :q], "mask": mask[:, :, :q, :mask.shape[3] - cut]}


RULES = {
    "last_position": lambda n, i: i[0][:, -1, :],
    "confident": lambda n, i: bool((i[0].softmax(-1).amax(-1).min() >= n.attrs["threshold"]).item()),
    "trim_block": _trim_block,
    "repetition_penalty": _rep,
    "repetition_penalty_seq": _rep_seq,
    "temperature": lambda n, i: _hf("TemperatureLogitsWarper", n.attrs["value"])(None, i[0]),
    "top_k": lambda n, i: _hf("TopKLogitsWarper", n.attrs["k"])(None, i[0]),
    "top_p": lambda n, i: _hf("TopPLogitsWarper", n.attrs["p"])(None, i[0]),
    "min_p": lambda n, i: _hf("MinPLogitsWarper", n.attrs["p"])(None, i[0]),
    "softmax": lambda n, i: torch.softmax(i[0], -1),
    "argmax": lambda n, i: i[0].argmax(-1),
    "multinomial": _multinomial,
    "sample_top_k": _sample_top_k,
    "gumbel_argmax": lambda n, i: (i[0] + i[1]).argmax(-1),
    "concat_seq": lambda n, i: torch.cat(i, 1),
    "as_seq": lambda n, i: i[0][:, None],
    "mark_seen": lambda n, i: i[0].clone().scatter_(1, i[1][:, None], 1.0),
    "merge_masks": _merge_masks,
    "next_inputs": lambda n, i: {"ids": i[0][:, None], "positions": i[1][:, -1:] + 1,
                                 "mask": torch.cat([i[2][:, :, -1:], torch.zeros_like(i[2][:, :, -1:, -1:])], 3)},
    "split_seq": lambda n, i: {"head": i[0][:, :i[1].shape[1]], "tail": i[0][:, i[1].shape[1]:]},
    "split_kv": _split_kv,
    "verify_greedy": _verify_greedy,
    "tail_positions": lambda n, i: i[0][:, -(n.attrs["length"] + 1):].reshape(-1, i[0].shape[-1]),
    "verify_sample": _verify_sample,
    "verify_sample_match": _verify_sample_match,
    "accepted_hidden": _accepted_hidden,
    "accept_unverified": _accept_unverified,
}


def _draft_loop(node, ins, models):
    """The loop body run k times, each iteration's outputs feeding the next one's inputs of the same name."""
    from dgopt.ir.loops import LOOP_CARRIED, draft_loop_body
    body, p = draft_loop_body(node), f"{node.id}/"
    state = dict(zip(LOOP_CARRIED, ins[:4] + ins[5:]))
    tokens = []
    for _ in range(int(ins[4])):
        out = run_graph(body, {p + n: v for n, v in state.items()}, models)
        tokens.append(out.pop("token"))
        go = out.pop("cond", True)          # a confidence threshold: the chain ends after an unsure proposal
        state = out
        if not go:
            break
    return {"proposals": torch.stack(tokens, 1), "kv": state["past"]}


def run_graph(g: Graph, feeds: dict, models: dict | None = None, generator: torch.Generator | None = None) -> dict:
    """`feeds` maps input names to tensors (kv inputs: a list of per-layer key/value tensors)."""
    import networkx as nx
    needed = set()
    for r in g.outputs.values():
        needed |= {r.node} | nx.ancestors(g._g, r.node)
    env = {}
    for node in g.topo_order():
        if node.id not in needed:
            continue
        ins = [env[r] for r in node.inputs]
        if node.op == "input":
            if node.attrs["name"] not in feeds:
                raise BackendError(f"reference: missing feed '{node.attrs['name']}'")
            env[node.out()] = feeds[node.attrs["name"]]
        elif node.op == "forward":
            h = node.out("hidden")
            wants = any(r == h for n in g.nodes() if n.id in needed for r in n.inputs)
            for k, v in _forward(node, ins, models or {}, wants).items():
                env[node.out(k)] = v
        elif node.op == "recycle_step":
            for k, v in _recycle_step(node, ins, models or {}).items():
                env[node.out(k)] = v
        elif node.op == "next_chain_length":
            alen, cands, cap, active = ins
            K = cands.shape[-1]
            full = bool((alen[active > 0] >= K + 1).all())
            env[node.out()] = torch.tensor(min(K + 2, int(cap)) if full else max(1, K - 1))
        elif node.op in ("recycle_chain", "recycle_loop"):    # recycle_steps, each fed the argmax before it
            h, tok, picks = ins[0], ins[1], []
            for _ in range(node.attrs["length"] if node.op == "recycle_chain" else int(ins[2])):
                out = _recycle_step(node, [h, tok], models or {})
                h, tok = out["hidden"], torch.argmax(out["logits"], -1)
                picks.append(tok)
            env[node.out("proposals")] = torch.stack(picks, 1)
        elif node.op == "draft_loop":
            for k, v in _draft_loop(node, ins, models or {}).items():
                env[node.out(k)] = v
        elif node.op == "to_candidates":     # the target's vocabulary bounds the ids it can embed
            ids = torch.where(ins[0] < models["target"].info["vocab_size"], ins[0], 0)
            env[node.out("ids")], env[node.out("candidates")] = ids, ids[:, None]
        elif node.op == "to_target_vocab":
            V = models["target"].info["vocab_size"]
            x = ins[0][:, :V]
            env[node.out()] = torch.cat([x, x.new_full((x.shape[0], V - x.shape[1]), float("-inf"))], 1)
        elif node.op == "random_uniform":
            env[node.out()] = torch.rand(ins[0].shape[0], generator=generator)
        elif node.op == "random_gumbel":
            env[node.out()] = -torch.log(-torch.log(torch.rand(ins[0].shape, generator=generator)))
        elif node.op in RULES:
            res = RULES[node.op](node, ins)
            if isinstance(res, dict):
                for k, v in res.items():
                    env[node.out(k)] = v
            else:
                env[node.out()] = res
        else:
            raise BackendError(f"reference: no rule for op '{node.op}'")
    return {name: env[r] for name, r in g.outputs.items()}


def exact_probs(g: Graph, logits: torch.Tensor, feeds: dict | None = None) -> torch.Tensor:
    """The exact distribution a sampler graph draws from: the `probs` feeding its multinomial."""
    mult = g.find("multinomial")
    if not mult:
        raise BackendError("exact_probs: graph has no multinomial")
    probe = g.copy()
    probe.outputs = {"probs": mult[0].inputs[0]}
    return run_graph(probe, {"logits": logits, **(feeds or {})})["probs"]
