"""Universal Assisted Generation: speculative decoding with a draft of ANOTHER tokenizer. Each step the draft
continues the row's committed text in its own tokens; the proposals' text is re-encoded with the target tokenizer
and verified like a same-tokenizer draft's (greedy: longest agreeing prefix plus a bonus token; sampled: matched
against the target's draws at each depth). The draft runs in its own step graph, one cache per row."""
from __future__ import annotations

import time

import numpy as np

from ..slots import causal
from .base import Strategy, draft_stats

__all__ = ["UAG", "XTokDrafter"]


class XTokDrafter:
    """Universal Assisted Generation: proposals from a draft with a different tokenizer, one draft cache per row.
    Each step the row's committed text is extended by its new target tokens and re-encoded with the draft's
    tokenizer from the start of a recent word on (not from the beginning: that would cost O(length) per step); the
    draft cache is cut back to the longest common prefix with what it holds (so a boundary token that re-tokenizes
    differently is recomputed), the draft continues greedily for k of its tokens, and their text is re-encoded with
    the target tokenizer behind a look-behind window of the last committed target tokens. The target's verification
    keeps the output exact (greedy, or distributed as sampling) whatever this produces; a bad translation only costs
    acceptance."""

    LOOKBEHIND = 8

    def __init__(self, dec, seqs: list[list[int]], done: list[bool], k: int, width: int | None = None):
        # k: draft tokens per step (k_schedule heuristic: set per step); the step verifies `width` candidates
        # (sampled: its K), or as many as the longest row has (greedy: the step reads their count off the shape)
        self.sess, self.k, self.width = dec.draft_session, k, width
        self.tt, self.dt = dec.tokenizer.backend_tokenizer, dec.draft_tokenizer.backend_tokenizer
        self.seqs = seqs                                     # committed target ids per row, extended by the loop
        self.done = done                                     # the loop's finished rows
        self.cache = [self.sess.new_cache(1) for _ in seqs]
        self.held: list[list[int]] = [[] for _ in seqs]     # draft ids whose KV is in cache[b]
        self.dmax = dec.manifest["draft"]["model"]["max_position_embeddings"] or dec.max_seq_len
        self.tvocab, self.pad = dec.vocab_size, dec.pad
        self.text = [""] * len(seqs)                        # decoded committed text per row ...
        self.n_text = [0] * len(seqs)                       # ... covering this many target tokens
        self.want: list[list[int]] = [[] for _ in seqs]     # its draft encoding ...
        self.start: list[list[int]] = [[] for _ in seqs]    # ... and each draft token's char offset
        self.kept = [0] * len(seqs)                         # want[:kept] was not re-encoded this step

    def _update_text(self, b: int) -> None:
        seq, n = self.seqs[b], self.n_text[b]
        w = max(0, n - 4)                       # decode the new tokens behind a few old ones: merges at the seam
        old = self.tt.decode(seq[w:n], skip_special_tokens=False)
        new = self.tt.decode(seq[w:], skip_special_tokens=False)
        if new.startswith(old) and not old.endswith("\ufffd"):
            self.text[b] += new[len(old):]
        else:                                   # a UTF-8 character split across the seam: decode everything
            self.text[b] = self.tt.decode(seq, skip_special_tokens=False)
        self.n_text[b] = len(seq)

    def _encode(self, b: int) -> list[int]:
        """The draft encoding of the row's text, re-encoded from the last word-initial token at least 8 draft
        tokens back (byte-level BPE does not merge across a pre-token boundary, so the prefix before it stands)."""
        text, want, start = self.text[b], self.want[b], self.start[b]
        j = max(0, len(want) - 8)
        while j > 0 and not (text[start[j]] in " \t\n" or text[start[j] - 1] == "\n"):
            j -= 1
        c = start[j] if j else 0
        enc = self.dt.encode(text[c:], add_special_tokens=False)
        self.want[b] = want[:j] + enc.ids
        self.start[b] = start[:j] + [c + o[0] for o in enc.offsets]
        self.kept[b] = j
        return self.want[b]

    def _feed(self, b: int, ids: list[int]) -> list[int]:
        """Feed `ids` to row b's draft; returns its greedy continuation: k tokens from a compiled chain (whose
        cache then also holds d_1..d_{k-1}), else the one next token."""
        p, q = len(self.held[b]), len(ids)
        mask = np.zeros((1, 1, q, p + q), np.float32)       # one row, no padding: all the past, causal in the block
        mask[0, 0, :, p:] = causal(q)
        feeds = {"input_ids": np.array([ids], np.int64), "position_ids": np.arange(p, p + q, dtype=np.int64)[None],
                 "attn_mask": mask}
        if "draft_k" in self.sess.inputs:      # a draft_loop chain: k of them
            feeds["draft_k"] = np.array(self.k, np.int64)
        out, self.cache[b] = self.sess.run(feeds, self.cache[b])
        if "proposals" in out:          # k of them, fewer where the chain stopped at an unsure one
            props = [int(t) for t in out["proposals"][0]]
            self.held[b].extend(ids + props[:-1])
            return props
        self.held[b].extend(ids)
        return [int(out["next_token"][0])]

    def _row(self, b: int) -> list[int]:
        self._update_text(b)
        want = self._encode(b)
        if not want or len(want) + self.k > self.dmax:
            return []
        held = self.held[b]
        n = min(len(held), len(want) - 1)                    # feed at least one token: its logits give d1
        # held is the previous step's encoding (and proposals); want[:kept] is unchanged from it
        p = min(self.kept[b], n)
        while p < n and held[p] == want[p]:
            p += 1
        if p < len(held):
            self.cache[b] = self.sess.commit(self.cache[b], p, np.array([p]), 0)
            del held[p:]
        props = self._feed(b, want[p:])
        while len(props) < self.k and "proposals" not in self.sess.outputs:      # one-token draft steps
            props += self._feed(b, [props[-1]])
        # the proposals' text, decoded in context (byte-level merges and leading spaces depend on it): behind the
        # last few tokens, whose text is the committed text from their offset on (no decode), or behind the whole
        # row where that does not hold up (a character split there)
        new = None
        for ctx, base in ((want[-4:], self.text[b][self.start[b][-4]:] if len(want) >= 4 else None), (want, None)):
            base = self.dt.decode(ctx, skip_special_tokens=False) if base is None else base
            full = self.dt.decode(ctx + props, skip_special_tokens=False)
            if full.startswith(base) and not base.endswith("\ufffd"):
                new = full[len(base):]
                break
        if new is None:
            new = self.dt.decode(props, skip_special_tokens=False)
        tail = self.seqs[b][-self.LOOKBEHIND:]
        enc = self.tt.encode(self.tt.decode(tail, skip_special_tokens=False) + new, add_special_tokens=False).ids
        return enc[len(tail):] if enc[:len(tail)] == tail else self.tt.encode(new, add_special_tokens=False).ids

    def propose(self) -> np.ndarray:
        """[B, 1, n]: each row's candidates (at most k), padded to the width."""
        rows = [[] if self.done[b] else [t for t in self._row(b) if t < self.tvocab][:self.k]
                for b in range(len(self.seqs))]
        self.counts = [len(c) for c in rows]
        cands = np.full((len(rows), 1, self.width or max(1, max(self.counts))), self.pad, np.int64)
        for b, c in enumerate(rows):
            cands[b, 0, :len(c)] = c
        return cands


class UAG(Strategy):
    def __init__(self, loop):
        super().__init__(loop)
        dec = loop.dec
        st = dec.manifest["strategy"]
        self.adaptive = st.get("k_schedule") == "heuristic"
        self.K = K = st["k_max"] if self.adaptive else st["k"]
        # sampled, the step verifies K candidates (padded); greedy, as many as the longest row has
        self.drafter = XTokDrafter(dec, loop.seqs, loop.done, st["k"], K if loop.sampled else None)
        self.uniform = loop.stream("uniform", loop.seed, (loop.B, K + 1), loop.steps_max) if loop.sampled else None
        self.proposed_n = 0
        self.t_draft = 0.0

    def propose(self, feeds):
        t = time.perf_counter()
        cands = self.drafter.propose()
        self.t_draft += time.perf_counter() - t
        if self.uniform is not None:
            feeds["depth_uniform"] = self.uniform.next()
        return cands, cands.shape[2], 1

    def proposed(self, out, cands, K):
        # each row's own candidates (a batch step is as wide as its longest row's)
        self.proposed_n += sum(c for c, d in zip(self.drafter.counts, self.loop.done) if not d)
        return cands, K

    def advance(self, m, got):
        if self.adaptive:   # transformers' heuristic on the draft's own tokens
            d = self.drafter
            full = all(mb >= c for mb, c, g in zip(m, d.counts, got) if g is not None)
            d.k = min(d.k + 2, self.K) if full else max(d.k - 1, 1)

    def stats(self):
        return draft_stats(self.loop, self.proposed_n, 0, self.t_draft)
