"""One row of speculative decoding (fused: draft and verification in one step graph; greedy or sampled) or of greedy
UAG: generate_multitoken's algorithm for the case users run most, one prompt, with Python ints where the batch loop
keeps [B] arrays. Sampled, it draws the same noise streams as the batch loop: same tokens per seed.

Each step costs one session call plus this bookkeeping; on the 2-core CPU with code-tiny + code-draft-sd the
bookkeeping, not the call, was what separated the speculative step from the autoregressive one (the batch loop's
~60 numpy operations per step ran 3-4x slower after onnxruntime's kernels had filled the caches). Same slots,
masks, holes, compaction, heuristic and early stop as the batch loop; tests/test_speculative_row.py checks the two
give the same tokens and the same stats."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np

from .decoder import GenerateResult
from .multitoken import _arange, _causal, _Slots, _XTokDrafter, rejection_noise

__all__ = ["generate_speculative_row"]


def generate_speculative_row(dec, row: list[int], max_new_tokens: int, budget: int, on_token=None,
                             seed: int | None = None) -> GenerateResult:
    st = dec.manifest["strategy"]
    adaptive = st.get("k_schedule") == "heuristic"
    K = st["k_max"] if adaptive else st["k"]
    k = st["k"]                                     # this step's draft_k (the heuristic moves it)
    sess = dec.session
    has_k, has_seen = "draft_k" in sess.inputs, "seen" in sess.inputs
    tvocab, eos = dec.vocab_size, dec.eos
    dvocab = dec.manifest["draft"]["model"]["vocab_size"]
    dpad = dec.manifest["draft"]["model"]["pad_token_id"]
    seen = None
    if has_seen:
        seen = np.zeros((1, tvocab), np.float32)
        seen[0, row] = 1.0
    noise = None
    if dec.manifest["sampling"]["kind"] == "sample":    # fused speculative: k draft draws, k tests + 1 draw a step
        noise = rejection_noise(dec, seed, 1, K, budget)
    tslots, dslots = _Slots(1), _Slots(1)           # the target's and (fused) the draft's cache slots
    cache = sess.new_cache(1)
    L = len(row)
    x = np.array([row], np.int64)                   # the x-block: the prompt, then each step's bonus token
    x0 = 0                                          # its first position
    pend, pend_pos = x, _arange(L)[None]            # what the draft has not seen yet (fused)
    seq = list(row)                                 # uag: the committed ids its drafter re-encodes as text
    xtok = _XTokDrafter(dec, [seq], k) if st["kind"] == "uag" else None
    out_ids: list[int] = []
    reason = "max_new_tokens"
    hist: Counter = Counter()
    steps = proposed = 0
    t_draft = 0.0
    t0 = time.perf_counter()
    t_prefill = None
    while True:
        qx = x.shape[1]
        if xtok is not None:        # the draft's own call: its proposals re-tokenized for the target
            td = time.perf_counter()
            xtok.room = dec.max_seq_len - x0 - qx           # verify positions under max_seq_len (as the batch loop)
            cands = xtok.propose()
            t_draft += time.perf_counter() - td
            kk = cands.shape[2]
            feeds = {"verify_ids": np.concatenate([x, cands[0]], 1), "candidates": cands}
        else:
            if adaptive:        # verify positions x0 .. x0 + qx + k - 1 under max_seq_len (as the batch loop)
                k = min(k, dec.max_seq_len - x0 - qx)
            kk, qd = k, pend.shape[1]
            if dvocab < tvocab:     # a smaller draft vocabulary: ids it cannot embed -> its pad
                pend = np.where(pend < dvocab, pend, dpad)
            feeds = {"draft_ids": pend, "draft_position_ids": pend_pos, "draft_mask": dslots.mask(_causal(qd)),
                     "x_ids": x}
            base = dslots.n + qd
            dslots.append_ones(qd + k - 1)          # the pending block, then d_1..d_{k-1}
            if has_k:
                feeds["draft_k"] = np.array(k, np.int64)
        feeds["verify_position_ids"] = (x0 + _arange(qx + kk))[None]
        feeds["verify_mask"] = tslots.mask(_causal(qx + kk))
        if has_seen:
            feeds["seen"] = seen
        if noise:
            du = noise[0].next()
            feeds.update({f"draft_uniform_{i}": du[:, i] for i in range(K)}, accept_uniform=noise[1].next())
        out, present = sess.run(feeds, cache)
        steps += 1
        if t_prefill is None:
            t_prefill = time.perf_counter() - t0
        if xtok is None:
            props = out["proposals"]
            n = props.shape[1]                      # k, or fewer where the chain stopped early
        else:
            n = kk
        a = int(out["accept_len"][0])
        m = a - 1
        got = out["accept_tokens"][0, :a].tolist()
        # target: the x-block, then n proposals of which the first m were accepted (the rest: masked holes)
        tslots.append_ones(qx)
        tslots.append_prefix((m,), n)
        idx = tslots.compaction()
        cache = present if idx is None else sess.select(present, idx)
        hist[a] += 1
        proposed += n if xtok is None else int(xtok.counts[0])
        done = False
        for i, t in enumerate(got):
            out_ids.append(t)
            if t in eos:
                reason, done, got = "eos", True, got[:i + 1]
                break
            if len(out_ids) >= budget:
                done, got = True, got[:i + 1]
                break
        seq.extend(got)
        if seen is not None:
            seen[0, got] = 1.0
        if on_token:
            for t in got:
                on_token([t])
        if done:
            break
        last = got[m]
        x0 = x0 + qx + m                            # the bonus token's position
        x = np.array([[last]], np.int64)
        if xtok is not None:
            if adaptive:        # transformers' heuristic on the draft's own tokens, as in the batch loop
                xtok.k = min(xtok.k + 2, K) if m >= xtok.counts[0] else max(xtok.k - 1, 1)
            continue
        # draft: d_1..d_{n-1} are in its cache, the rejected ones masked; d_n, when accepted, was never fed to it
        dslots.n = base
        dslots.append_prefix((m,), n - 1)
        idx = dslots.compaction()
        if idx is not None:
            cache = sess.select(cache, idx, part="draft_past")
        if m == n:
            pend, pend_pos = np.array([[int(props[0, -1]), last]], np.int64), np.array([[x0 - 1, x0]], np.int64)
        else:
            pend, pend_pos = x, np.array([[x0]], np.int64)
        if adaptive:    # transformers' heuristic: 2 more after a step that accepted every proposal, else 1 fewer
            k = min(k + 2, K) if m == n else max(k - 1, 1)

    for stream in noise or ():
        stream.close()
    if reason == "max_new_tokens" and len(out_ids) < max_new_tokens:
        reason = "max_seq_len"
    elapsed = time.perf_counter() - t0
    stats = {
        "steps": steps, "new_tokens": len(out_ids), "batch": 1,
        "tokens_per_step": round(len(out_ids) / steps, 4),
        "accepted_hist": {str(a): c for a, c in sorted(hist.items())},
        "prefill_s": round(t_prefill or 0.0, 6), "total_s": round(elapsed, 6),
        "tokens_per_s": round(len(out_ids) / max(elapsed, 1e-9), 2), "stop": [reason],
        "acceptance_rate": round(sum((a - 1) * c for a, c in hist.items()) / max(proposed, 1), 4),
        "mean_k": round(proposed / max(steps, 1), 3),
        "cache_compactions": tslots.compactions + dslots.compactions}
    if xtok is None:
        stats["fused"] = True
    else:
        stats["draft_s"], stats["target_s"] = round(t_draft, 6), round(elapsed - t_draft, 6)
    return GenerateResult([out_ids], None, stats)
