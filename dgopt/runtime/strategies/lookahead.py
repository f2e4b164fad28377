"""Lookahead decoding (Fu et al. 2024): one step holds the x-block, the (N-1) x W Jacobi window (its own branch,
inputs lookahead_*) and G candidate (N-1)-grams from the row's n-gram pool keyed by its last token (the verify
branch); the branches cannot see each other. The window's argmax refreshes the window; its columns' trajectories
become new n-grams."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..slots import lookahead_structure
from .base import Strategy, initial_guesses

__all__ = ["Lookahead", "NgramPool"]


class NgramPool:
    """n-gram pool of one row: key token -> the most recent G continuations of length K (LRU)."""

    def __init__(self, G: int, K: int):
        self.G, self.K = G, K
        self.map: dict[int, OrderedDict] = {}

    def add(self, key: int, cont) -> None:
        cont = tuple(int(t) for t in cont)
        if len(cont) != self.K or self.G == 0:
            return
        od = self.map.setdefault(int(key), OrderedDict())
        od.pop(cont, None)
        od[cont] = None
        if len(od) > self.G:
            od.popitem(last=False)

    def add_sequence(self, seq, start: int = 0) -> None:
        """Every n-gram of `seq` whose last token is at index >= start + K."""
        for i in range(max(0, start - self.K), len(seq) - self.K):
            self.add(seq[i], seq[i + 1:i + 1 + self.K])

    def candidates(self, key: int, fallback) -> np.ndarray:
        got = list(reversed(self.map.get(int(key), {})))[: self.G]
        while len(got) < self.G:
            got.append(got[0] if got else tuple(fallback))
        return np.array(got, np.int64).reshape(self.G, self.K)


class Lookahead(Strategy):
    commit = "gather"

    def __init__(self, loop):
        super().__init__(loop)
        st = loop.dec.manifest["strategy"]
        self.W, N, self.G = st["window"], st["ngram"], st["guesses"]
        self.K = self.levels_max = N - 1
        self.pools = [NgramPool(self.G, self.K) for _ in range(loop.B)]
        for pool, r in zip(self.pools, loop.rows):
            pool.add_sequence(r)
        self.window = np.zeros((loop.B, 0, self.W), np.int64)
        if self.levels_max:     # window level 0: tokens drawn from the prompt
            self.window = initial_guesses(loop.rows, max(self.W, self.K, 1))[:, None, :self.W]
        self.branch = "lookahead_ids" in loop.sess.inputs
        self.uniform = loop.stream("uniform", loop.seed, (loop.B, self.K + 1), loop.steps_max) \
            if loop.sampled else None

    def propose(self, feeds):
        loop, K, W = self.loop, self.K, self.W
        x_ids, x_pos = loop.x_ids, loop.x_pos
        B, k = x_ids.shape
        cands = np.stack([self.pools[b].candidates(x_ids[b, -1], [x_ids[b, -1]] * K) for b in range(B)])
        if self.uniform is not None:
            feeds["depth_uniform"] = self.uniform.next()
        if self.branch:
            levels = self.window.shape[1]
            la_pos = x_pos[:, -1, None, None] + 1 + np.arange(W)[None, None, :] + np.arange(levels)[None, :, None]
            la_pos = np.minimum(la_pos.reshape(B, -1), loop.max_pos)
            x_part = loop.x_valid
            feeds.update(lookahead_ids=np.concatenate([x_ids, self.window.reshape(B, -1)], 1),
                         lookahead_position_ids=np.concatenate([x_pos, la_pos], 1),
                         lookahead_mask=loop.slots.mask(lookahead_structure(k, levels, W), x_part))
        return cands, K, self.G

    def proposed(self, out, cands, K):
        self.out = out
        return cands, K

    def advance(self, m, got):
        loop, W = self.loop, self.W
        for b, g in enumerate(got):
            if g is not None:
                seq = loop.seqs[b]
                self.pools[b].add_sequence(seq, start=len(seq) - len(g))
        if not self.levels_max:
            return
        B, levels = loop.B, self.window.shape[1]
        k = self.out["lookahead_tokens"].shape[1] - levels * W
        la = self.out["lookahead_tokens"][:, k:].reshape(B, levels, W).astype(np.int64)
        if levels < self.levels_max:
            self.window = np.concatenate([self.window, la[:, -1:, :]], 1)
            return
        for b in range(B):
            for j in range(W):
                self.pools[b].add(self.window[b, 0, j], list(self.window[b, 1:, j]) + [la[b, -1, j]])
        self.window = np.concatenate([self.window[:, 1:], la[:, -1:, :]], 1)
