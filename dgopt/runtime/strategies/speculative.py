"""Speculative decoding with a draft model of the same tokenizer. Fused (the default): the draft's chain and the
target's verification are one step graph, one call per step; the host feeds the draft's pending tokens, positions
and mask and commits both caches. Unfused: the draft's own step graph (draft.onnx) runs before the target.
Greedy: the longest prefix of proposals equal to the target's argmax chain, plus a bonus token. Sampled: rejection
sampling against the draft's q (exact in distribution), with two precomputed noise streams."""
from __future__ import annotations

import time

import numpy as np

from ..slots import Slots, causal
from .base import Strategy, draft_stats

__all__ = ["Speculative", "Drafter"]


class Drafter:
    """Proposals from the draft model. Its cache holds the committed tokens it has seen; `pend` are committed tokens
    it has not (the prompt at first, then the bonus token, or d_k and the bonus when all k proposals were accepted).
    After verification its cache is cut back to the accepted prefix (rejected proposals: masked holes).
    With its own step graph (draft.onnx) it runs before the target (`propose`); in a fused step it only supplies the
    draft's inputs (`feeds`) and commits the draft's part of the shared cache (`accept`)."""

    def __init__(self, loop, k: int, uniform=None):
        dec = loop.dec
        self.loop, self.k = loop, k           # k: this step's proposals (k_schedule heuristic: set per step)
        self.n = k                            # the last step's proposals: k, or fewer where the chain stopped early
        self.fused = dec.draft_session is None
        self.sess = dec.session if self.fused else dec.draft_session
        self.uniform = uniform                # sampling: [B, 1] draws; proposals come from the draft's q
        self.cache = None if self.fused else self.sess.new_cache(loop.B)
        self.slots = Slots(loop.B)
        self.pend, self.pend_valid, self.pend_pos = loop.x_ids, loop.x_valid, loop.x_pos
        self.tvocab = dec.vocab_size
        self.dvocab = dec.manifest["draft"]["model"]["vocab_size"]
        self.dpad = dec.manifest["draft"]["model"]["pad_token_id"]
        self.has_k = "draft_k" in self.sess.inputs

    def _pend_pos(self) -> np.ndarray:
        """The pending block's positions; near max_seq_len moved back so that the chain's d_1..d_{k-1} stay inside
        the position table (only proposals whose tokens would be dropped see a moved position)."""
        top = self.loop.max_pos - (self.k - 1)
        return np.minimum(self.pend_pos, top) if max(self.loop.pos_last) > top else self.pend_pos

    def _inputs(self, ids, valid_blk, pos) -> tuple:
        """ids, positions and mask of a block fed to the draft (valid_blk None: every slot valid); its slots join
        the draft's slot map."""
        if self.dvocab < self.tvocab:       # a smaller draft vocabulary: out-of-range ids -> pad
            ids = np.where(ids < self.dvocab, ids, self.dpad)
        mask = self.slots.mask(causal(ids.shape[1]), valid_blk)
        self.slots.append(valid_blk, ids.shape[1])
        return ids, pos, mask

    def _step(self, ids, valid_blk, pos, out_name: str = "next_token"):
        ids, pos, mask = self._inputs(ids, valid_blk, pos)
        feeds = {"input_ids": ids, "position_ids": pos, "attn_mask": mask}
        if self.has_k:                      # draft.onnx's chain is a loop: this step's k proposals
            feeds["draft_k"] = np.array(self.k, np.int64)
        out, self.cache = self.sess.run(feeds, self.cache)
        if self.uniform is None:
            return out[out_name].astype(np.int64)
        q = out["probs"].astype(np.float64)
        V = self.tvocab
        if q.shape[1] > V:              # ids the target cannot embed: drop them; the renormalised q is the proposal
            q = q[:, :V]
        q = q / q.sum(1, keepdims=True)
        cdf = np.cumsum(q, 1)
        d = np.minimum((cdf <= self.uniform.next() * cdf[:, -1:]).sum(1), q.shape[1] - 1)
        qf = np.zeros((len(q), V), np.float32)
        qf[:, :q.shape[1]] = q
        self.q.append(qf)
        return d.astype(np.int64)

    def feeds(self) -> dict:
        """Fused step: the draft's inputs (pending block, its positions, its mask over the draft cache)."""
        self.base = self.slots.n + self.pend.shape[1]
        ids, pos, mask = self._inputs(self.pend, self.pend_valid, self._pend_pos())
        self.slots.append(None, self.k - 1)                 # d_1..d_{k-1}
        return {"draft_ids": ids, "draft_position_ids": pos, "draft_mask": mask}

    def propose(self) -> np.ndarray:
        self.base = self.slots.n + self.pend.shape[1]
        self.q = []
        if "proposals" in self.sess.outputs:      # the compiled chain: k proposals (fewer if it stops early)
            props = self._step(self.pend, self.pend_valid, self._pend_pos(), "proposals")
            self.slots.append(None, props.shape[1] - 1)
        else:
            d = [self._step(self.pend, self.pend_valid, self.pend_pos)]
            last = self.pend_pos[:, -1:]
            for i in range(1, self.k):
                d.append(self._step(d[-1][:, None], None, np.minimum(last + i, self.loop.max_pos)))
            props = np.stack(d, 1)
        # a draft vocabulary larger than the target's can propose ids the target cannot embed: such a proposal can
        # never equal the target's argmax, so any in-range stand-in keeps verification exact
        return np.where(props < self.tvocab, props, 0)[:, None, :]

    def accept(self, m: list[int], proposals: np.ndarray, cache=None):
        """Mask the rejected proposals out of the draft's cache; fused: it is part of the step's `cache`, returned.
        The bonus token (the loop's next x-block) is the draft's next input."""
        # d_1..d_{n-1} are in the draft's cache (n: the proposals made, k or fewer where the chain stopped early):
        # the rejected ones stay as masked holes (compacted rarely)
        loop = self.loop
        self.n = n = proposals.shape[-1]
        self.slots.n = self.base
        self.slots.append_prefix(m, n - 1)
        idx = self.slots.compaction()
        if idx is not None and self.fused:
            cache = self.sess.select(cache, idx, part="draft_past")
        elif idx is not None:
            self.cache = self.sess.select(self.cache, idx)
        full = [mb == n for mb in m]                       # d_n accepted but never fed to the draft
        # a finished row's draft goes on from its real last token, not the target's pad: in a batch, one unsure row
        # ends every row's chain (confidence), and a draft fed pad is unsure (measured: 49 -> 55 steps at batch 8)
        last = loop.x_ids if not any(loop.done) else np.array(loop.last, np.int64)[:, None]
        if not any(full):           # the usual step: the bonus token alone, valid in every row
            self.pend, self.pend_valid, self.pend_pos = last, None, loop.x_pos
            return cache
        self.pend = np.concatenate([proposals[:, 0, -1:], last], 1)
        self.pend_valid = np.ones((loop.B, 2), np.int8)
        self.pend_valid[:, 0] = full
        self.pend_pos = np.concatenate([loop.x_pos - 1, loop.x_pos], 1)
        return cache


class Speculative(Strategy):
    def __init__(self, loop):
        super().__init__(loop)
        dec, B = loop.dec, loop.B
        st = dec.manifest["strategy"]
        self.adaptive = st.get("k_schedule") == "heuristic"
        self.K = K = st["k_max"] if self.adaptive else st["k"]     # the most proposals a step verifies
        self.fused = dec.draft_session is None
        if self.fused:
            self.ids_name = "x_ids"         # the step concatenates the x-block and the chain's proposals itself
        self.has_k = "draft_k" in loop.sess.inputs
        draft_noise = self.accept_noise = None
        if loop.sampled:    # rejection sampling: the draft's draws and the acceptance tests, independent streams
            streams = np.random.SeedSequence(loop.seed).spawn(2)
            n = loop.steps_max
            draft_noise = loop.stream("uniform", streams[0], (B, K) if self.fused else (B, 1),
                                      n if self.fused else n * K)
            self.accept_noise = loop.stream("uniform", streams[1], (B, K + 1), n)
        self.draft_noise = draft_noise
        self.drafter = Drafter(loop, st["k"], None if self.fused else draft_noise)
        self.proposed_n = 0
        self.t_draft = 0.0

    def propose(self, feeds):
        d = self.drafter
        if self.fused:
            feeds.update(d.feeds())
            if self.has_k:
                feeds["draft_k"] = np.array(d.k, np.int64)
            if self.draft_noise is not None:
                du = self.draft_noise.next()
                feeds.update({f"draft_uniform_{i}": du[:, i] for i in range(self.K)})
                feeds["accept_uniform"] = self.accept_noise.next()
            return None, d.k, 1
        t = time.perf_counter()
        cands = d.propose()
        self.t_draft += time.perf_counter() - t
        if self.accept_noise is not None:
            feeds["accept_uniform"] = self.accept_noise.next()
            feeds["draft_probs"] = np.stack(d.q, 1)
        return cands, cands.shape[2], 1

    def proposed(self, out, cands, K):
        if self.fused:      # the proposals made (a chain with a confidence threshold can stop early)
            cands = out["proposals"][:, None, :]
            K = cands.shape[2]
        self.cands = cands
        self.proposed_n += K * (self.loop.B - sum(self.loop.done))
        return cands, K

    def advance(self, m, got):
        d, loop = self.drafter, self.loop
        loop.cache = d.accept(m, self.cands, loop.cache)
        if self.adaptive:   # transformers' heuristic: 2 more after a step that accepted every proposal, else 1 fewer
            full = all(mb == d.n for mb, g in zip(m, got) if g is not None)
            d.k = min(d.k + 2, self.K) if full else max(d.k - 1, 1)

    def stats(self):
        return draft_stats(self.loop, self.proposed_n, self.drafter.slots.compactions,
                           None if self.fused else self.t_draft)

