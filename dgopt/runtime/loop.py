"""The one decode loop: every strategy is the same loop of propose -> ONE step-graph call -> accept a prefix per row
-> commit its KV -> stop rows -> stream. The per-kind parts are objects of dgopt/runtime/strategies/ (interface in
strategies/base.py).

A batch is left-padded; every row has its own positions, so rows advance in lockstep while each keeps its exact
context (rows that accept fewer tokens get masked holes in the cache). Positions past target.max_seq_len - 1 are
clamped: a token the loop keeps is always computed at a position below max_seq_len - 1 (a row's budget is
max_seq_len - its prompt), so only candidates whose tokens would be dropped anyway see a clamped position, and every
strategy generates what autoregressive decoding generates up to max_seq_len."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from .noise import NoiseStream
from .slots import Slots, arange, verify_structure
from .strategies import STRATEGIES

__all__ = ["GenerateResult", "Loop", "generate"]


@dataclass
class GenerateResult:
    ids: list[list[int]]                     # new tokens per row (EOS included when it stopped the row)
    text: list[str] | None = None
    stats: dict = field(default_factory=dict)


class Loop:
    """One generate call's shared state; strategies read the x-block, rows and limits from it."""

    def __init__(self, dec, rows: list[list[int]], max_new_tokens: int | Sequence[int], seed: int | None):
        self.dec, self.sess = dec, dec.session
        self.B = B = len(rows)
        self.rows = rows
        self.max_new = [max_new_tokens] * B if isinstance(max_new_tokens, (int, np.integer)) else \
            [int(n) for n in max_new_tokens]
        if len(self.max_new) != B:
            raise ValueError(f"max_new_tokens has {len(self.max_new)} entries for a batch of {B}")
        if any(n < 0 for n in self.max_new):
            raise ValueError(f"max_new_tokens must be >= 0 (got {min(self.max_new)})")
        for r in rows:
            if len(r) >= dec.max_seq_len:
                raise ValueError(f"prompt of {len(r)} tokens leaves no room under target.max_seq_len "
                                 f"{dec.max_seq_len}")
        self.max_pos = dec.max_seq_len - 1
        self.budget = [min(n, dec.max_seq_len - len(r)) for n, r in zip(self.max_new, rows)]
        self.seed = dec.manifest["sampling"].get("seed", 0) if seed is None else seed
        self.sampled = dec.manifest["sampling"]["kind"] == "sample"
        L = max(len(r) for r in rows)
        x_ids = np.full((B, L), dec.pad, np.int64)
        x_valid = np.zeros((B, L), np.int8)
        for b, r in enumerate(rows):
            x_ids[b, L - len(r):] = r
            x_valid[b, L - len(r):] = 1
        self.x_ids, self.x_valid = x_ids, x_valid
        self.x_pos = np.maximum(np.cumsum(x_valid, 1) - 1, 0).astype(np.int64)
        self.pos_last = [len(r) - 1 for r in rows]           # each row's last x-block position
        self.seqs = [list(r) for r in rows]                   # prompt + committed tokens per row
        self.done = [n <= 0 for n in self.budget]
        self.cache = self.sess.new_cache(B)
        self._streams: list[NoiseStream] = []
        self.joins = 0
        self.last = [dec.pad] * B

    def joinable(self, strat) -> bool:
        """Whether rows can join this call while it runs: a strategy that keeps no per-row state of its own
        (autoregressive, greedy: no noise stream sized at the start) on a session whose cache can grow rows."""
        return getattr(strat, "joinable", False) and getattr(self.sess, "grow", None) is not None

    def _join(self, new, out_ids, reason, ended, seen):
        """Start rows `new` [(b, prompt ids, max_new_tokens)]: b a finished row (its slots are forgotten) or the next
        index (the batch grows by a row). Their prompts become the next x-block's rows, left-padded beside the
        running rows' one token (a prefill in the same step); returns (B, seen)."""
        B0 = self.B
        grow = sum(1 for b, _, _ in new if b >= B0)
        if grow:
            if B0 + grow > self.dec.max_batch:
                raise ValueError(f"{B0 + grow} rows exceed the artifact's target.max_batch {self.dec.max_batch}")
            if sorted(b for b, _, _ in new if b >= B0) != list(range(B0, B0 + grow)):
                raise ValueError("rows join at free rows or at the next indices")
            self.cache = self.sess.grow(self.cache, grow)
            self.slots.grow(grow)
            for lst, v in ((self.rows, []), (self.max_new, 0), (self.budget, 0), (self.seqs, []), (self.done, True),
                           (self.pos_last, 0), (out_ids, []), (reason, "max_new_tokens"), (ended, True),
                           (self.last, self.dec.pad)):
                lst += [list(v) if isinstance(v, list) else v for _ in range(grow)]
            if seen is not None:
                seen = np.concatenate([seen, np.zeros((grow, seen.shape[1]), seen.dtype)])
            self.B = B0 + grow
        B = self.B
        L = max(len(ids) for _, ids, _ in new)
        x_ids = np.full((B, L), self.dec.pad, np.int64)
        x_valid = np.zeros((B, L), np.int8)
        x_pos = np.zeros((B, L), np.int64)
        for b in range(B):
            if not self.done[b]:
                x_ids[b, -1], x_valid[b, -1], x_pos[b, -1] = self.last[b], 1, self.pos_last[b]
        for b, ids, mx in new:
            if len(ids) >= self.dec.max_seq_len or not ids:
                raise ValueError(f"a joining prompt of {len(ids)} tokens does not fit target.max_seq_len "
                                 f"{self.dec.max_seq_len}")
            self.slots.forget(b)
            x_ids[b, L - len(ids):], x_valid[b, L - len(ids):] = ids, 1
            x_pos[b, L - len(ids):] = np.arange(len(ids))
            self.rows[b], self.seqs[b], out_ids[b] = list(ids), list(ids), []
            self.max_new[b], self.budget[b] = mx, min(mx, self.dec.max_seq_len - len(ids))
            self.done[b], ended[b], reason[b] = self.budget[b] <= 0, False, "max_new_tokens"
            self.pos_last[b] = len(ids) - 1
            if seen is not None:
                seen[b] = 0.0
                seen[b, ids] = 1.0
        self.x_ids, self.x_valid, self.x_pos = x_ids, x_valid, x_pos
        self.joins += len(new)
        return B, seen

    def stream(self, kind: str, seed, shape: tuple[int, ...], total: int) -> NoiseStream:
        """A noise stream closed when the call ends."""
        s = NoiseStream(kind, seed, shape, total=total)
        self._streams.append(s)
        return s

    @property
    def steps_max(self) -> int:
        """The most steps the call can take (each commits >= 1 token per unfinished row)."""
        return max(self.budget)

    def run(self, on_token=None, should_stop=None, admit=None, on_done=None) -> GenerateResult:
        dec, sess, B = self.dec, self.sess, self.B
        strat = STRATEGIES[dec.manifest["strategy"]["kind"]](self)
        if admit is not None and not self.joinable(strat):
            admit = None
        eos, max_pos, budget, done = dec.eos, self.max_pos, self.budget, self.done
        seen = None                     # repetition penalty: the tokens of each row so far (prompt + committed)
        if "seen" in sess.inputs:
            seen = np.zeros((B, dec.vocab_size), np.float32)
            for b, r in enumerate(self.rows):
                seen[b, r] = 1.0
        has_cands = "candidates" in sess.inputs
        slots = self.slots = Slots(B)
        out_ids: list[list[int]] = [[] for _ in range(B)]
        reason = ["max_new_tokens"] * B
        ended = [False] * B             # on_done was called
        hist: Counter = Counter()
        steps = 0
        t0 = time.perf_counter()
        t_prefill = None
        try:
            while not all(done):
                x_ids, x_pos, x_valid = self.x_ids, self.x_pos, self.x_valid
                qx = x_ids.shape[1]
                feeds = {}
                cands, K, G = strat.propose(feeds)
                # the verify block's positions: the x-block, then each guess's K positions after its last token
                if not K:
                    v_pos = x_pos
                elif qx == 1 and G == 1:
                    v_pos = x_pos + arange(K + 1)
                else:
                    v_pos = np.concatenate([x_pos, x_pos[:, -1:] + np.tile(arange(K + 1)[1:], G)[None]], 1)
                if max(self.pos_last) + K > max_pos:
                    v_pos = np.minimum(v_pos, max_pos)
                feeds[strat.pos_name] = v_pos
                feeds[strat.mask_name] = slots.mask(verify_structure(qx, G, K), x_valid)
                if cands is None:
                    feeds[strat.ids_name] = x_ids
                else:
                    feeds[strat.ids_name] = np.concatenate([x_ids, cands.reshape(B, -1)], 1)
                    if has_cands:
                        feeds["candidates"] = cands
                if seen is not None:
                    feeds["seen"] = seen
                out, present = sess.run(feeds, self.cache)
                steps += 1
                if t_prefill is None:
                    t_prefill = time.perf_counter() - t0
                cands, K = strat.proposed(out, cands, K)
                alen, chain = strat.accepted(out)
                m = [a - 1 for a in alen]

                # KV: the x-block's slots, then the accepted candidates'
                past = slots.n
                slots.append(x_valid, qx)
                if strat.commit == "holes" or self.joins:   # a rejected proposal's (or a join's padding) slot
                    # stays, masked: no copy of the cache
                    slots.append_prefix(m, K)
                    idx = slots.compaction()
                    self.cache = present if idx is None else sess.select(present, idx)
                elif strat.commit == "gather":  # most of a step's slots are guesses: keep the accepted ones only
                    M = max(m)
                    self.cache = sess.commit(present, past + qx, past + qx + out["best"] * K, M)
                    slots.append_prefix(m, M)
                else:
                    self.cache = present

                got: list[list[int] | None] = [None] * B
                for b in range(B):
                    if done[b]:
                        continue
                    a = alen[b]
                    hist[a] += 1
                    g = chain[b][:a]
                    for i, t in enumerate(g):
                        if t in eos:
                            g, done[b], reason[b] = g[:i + 1], True, "eos"
                            break
                    left = budget[b] - len(out_ids[b])
                    if len(g) >= left:
                        g, done[b] = g[:left], True
                    out_ids[b] += g
                    self.seqs[b] += g
                    if seen is not None:
                        seen[b, g] = 1.0
                    got[b] = g
                if on_token:
                    for i in range(max(len(g) for g in got if g is not None) if any(got) else 0):
                        on_token([g[i] if g is not None and i < len(g) else None for g in got])
                if should_stop:
                    for b in should_stop():
                        if not done[b]:
                            done[b], reason[b] = True, "cancelled"
                if on_done:
                    for b in range(B):
                        if done[b] and not ended[b]:
                            ended[b] = True
                            on_done(b, reason[b] if reason[b] != "max_new_tokens" or len(out_ids[b]) >=
                                    self.max_new[b] else "max_seq_len")

                # the next x-block: each row's last accepted token; finished rows stay where they are (their
                # positions must not run past the model's position table)
                last = self.last = [chain[b][m[b]] for b in range(B)]
                if B == 1:
                    self.x_ids = np.array([[dec.pad if done[0] else last[0]]], np.int64)
                else:
                    self.x_ids = np.array([[dec.pad if d else t] for d, t in zip(done, last)], np.int64)
                for b in range(B):
                    if not done[b]:
                        self.pos_last[b] += m[b] + 1
                self.x_pos = np.array([[p] for p in self.pos_last], np.int64)
                self.x_valid = None
                if not all(done):
                    strat.advance(m, got)
                if admit is not None:   # continuous batching: requests join at the next step
                    joining = admit([b for b in range(B) if done[b]])
                    if joining:
                        B, seen = self._join(joining, out_ids, reason, ended, seen)
                        strat.joined()
        finally:
            for s in self._streams:
                s.close()
        for b in range(B):
            if reason[b] == "max_new_tokens" and len(out_ids[b]) < self.max_new[b]:
                reason[b] = "max_seq_len"
        elapsed = time.perf_counter() - t0
        new = sum(len(r) for r in out_ids)
        stats = {
            "steps": steps, "new_tokens": new, "batch": B,
            "tokens_per_step": round(new / (B * steps), 4) if steps else 0.0,
            "prefill_s": round(t_prefill or 0.0, 6), "total_s": round(elapsed, 6),
            "tokens_per_s": round(new / max(elapsed, 1e-9), 2), "stop": reason,
        }
        if self.joins:
            stats["joined"] = self.joins
        if strat.multi_token:
            stats["accepted_hist"] = {str(a): c for a, c in sorted(hist.items())}
        else:
            stats["decode_tokens_per_s"] = round((new - B) / max(elapsed - (t_prefill or 0), 1e-9), 2) \
                if steps > 1 else 0.0
        self.hist, self.steps, self.elapsed = hist, steps, elapsed
        stats.update(strat.stats())
        return GenerateResult(out_ids, None, stats)


def generate(dec, rows: list[list[int]], max_new_tokens: int | Sequence[int] = 64, seed: int | None = None,
             on_token: Callable[[list[int | None]], None] | None = None,
             should_stop: Callable[[], Iterable[int]] | None = None,
             admit: Callable[[list[int]], list[tuple[int, list[int], int]]] | None = None,
             on_done: Callable[[int, str], None] | None = None) -> GenerateResult:
    return Loop(dec, rows, max_new_tokens, seed).run(on_token, should_stop, admit, on_done)
