"""KV slots and step masks, shared by every strategy.

The cache is a list of slots; `Slots` says which hold a committed token of each row. Rows that accept fewer tokens
than others get masked holes, so a batch advances in lockstep while every row keeps its exact context. A step's mask
is the slot row under each of the step's queries beside the step block's own structure (who sees whom inside the
block): two slice copies, nothing of the past rebuilt."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = ["MASK_MIN", "Slots", "arange", "causal", "verify_structure", "lookahead_structure", "frozen"]

MASK_MIN = float(np.finfo(np.float32).min)   # finite: a fully masked (pad) query row stays NaN-free


class Slots:
    """The cache slots of every row as the additive mask value each query adds for them (0: a committed token;
    MASK_MIN: left padding, or a hole where a row accepted fewer tokens than another), in a buffer that grows by
    doubling."""

    def __init__(self, B: int):
        self.buf = np.empty((B, 256), np.float32)
        self.n = 0
        self._check_at = 64
        self.compactions = 0

    def compaction(self) -> np.ndarray | None:
        """Slots to keep [B, keep] once holes make up over a third of the slots (then the map is compacted: the
        caller gathers the cache by them), else None. Checked at doubling sizes: O(1) per slot."""
        if self.n < self._check_at:
            return None
        n, ok = self.n, self.buf[:, :self.n] == 0
        keep = int(ok.sum(1).max())
        if 3 * keep >= 2 * n:           # few holes: look again at twice the size
            self._check_at = 2 * n
            return None
        self._check_at = 2 * max(keep, 32)
        # row b: its committed slots in order, after keep - count[b] masked ones (slot 0, any slot will do)
        idx = np.zeros((len(ok), keep), np.int64)
        self.buf[:, :keep] = MASK_MIN
        for b in range(len(ok)):
            where = np.flatnonzero(ok[b])
            idx[b, keep - len(where):] = where
            self.buf[b, keep - len(where):keep] = 0.0
        self.n = keep
        self.compactions += 1
        return idx

    def grow(self, n: int) -> None:
        """n more rows, every slot of theirs masked (rows that join a running call)."""
        self.buf = np.concatenate([self.buf, np.full((n, self.buf.shape[1]), MASK_MIN, np.float32)])

    def forget(self, b: int) -> None:
        """Row b's slots all become holes (a finished row taken by a new request); the next compaction() looks at
        once (when every row turns over, its whole past goes: the new rows attend over their own slots only)."""
        self.buf[b, :self.n] = MASK_MIN
        self._check_at = 0

    def _room(self, k: int) -> None:
        if self.n + k > self.buf.shape[1]:
            buf = np.empty((len(self.buf), 2 * (self.n + k)), np.float32)
            buf[:, :self.n] = self.buf[:, :self.n]
            self.buf = buf

    def append(self, valid: np.ndarray | None, k: int = 0) -> None:
        """The next slots: valid [B, k] (truthy: a committed token), or None: k slots, all committed."""
        if valid is not None:
            k = valid.shape[1]
        self._room(k)
        self.buf[:, self.n:self.n + k] = 0.0 if valid is None or valid.all() else \
            np.where(valid.astype(bool), 0.0, MASK_MIN)
        self.n += k

    def append_prefix(self, m: Sequence[int], k: int) -> None:
        """k slots of which row b's first min(m[b], k) hold committed tokens (accepted proposals), the rest are
        holes. m: Python ints (two slice writes per row: no [B, k] comparison for the usual few rows)."""
        self._room(k)
        blk = self.buf[:, self.n:self.n + k]
        for b, mb in enumerate(m):
            mb = min(mb, k)
            blk[b, :mb], blk[b, mb:] = 0.0, MASK_MIN
        self.n += k

    def mask(self, block: np.ndarray, x_valid: np.ndarray | None = None) -> np.ndarray:
        """[B, 1, q, n + q]: the past, then `block` [q, q] (the step's structure as an additive bias); x_valid [B, k]
        limits the block's first k columns (the x-block: a left-padded prompt at prefill)."""
        B, P, q = len(self.buf), self.n, block.shape[0]
        m = np.empty((B, 1, q, P + q), np.float32)
        m[:, 0, :, :P] = self.buf[:, None, :P]
        m[:, 0, :, P:] = block
        if x_valid is not None and not x_valid.all():
            k = x_valid.shape[1]
            m[:, 0, :, P:P + k] = np.where(x_valid[:, None, :].astype(bool), m[:, 0, :, P:P + k], MASK_MIN)
        return m


def frozen(fn):
    """Memoise a step-block structure builder (called every step with a handful of distinct shapes) as the additive
    bias of its [q, q] bool result (who sees whom: 0, else MASK_MIN); results read-only."""
    @lru_cache(maxsize=64)
    def wrapped(*args):
        a = np.where(fn(*args), 0.0, MASK_MIN).astype(np.float32)
        a.setflags(write=False)
        return a
    return wrapped


@lru_cache(maxsize=64)
def arange(n: int) -> np.ndarray:
    a = np.arange(n)
    a.setflags(write=False)
    return a


@frozen
def causal(q: int) -> np.ndarray:
    return np.tril(np.ones((q, q), bool))


@frozen
def verify_structure(k: int, G: int, K: int) -> np.ndarray:
    """The x-block (k tokens, causal), then G candidates of K tokens: each sees the x-block and its own prefix."""
    q = k + G * K
    s = np.zeros((q, q), bool)
    s[:k, :k] = np.tril(np.ones((k, k), bool))
    for g in range(G):
        o = k + g * K
        s[o:o + K, :k] = True
        s[o:o + K, o:o + K] = np.tril(np.ones((K, K), bool))
    return s


@frozen
def lookahead_structure(k: int, levels: int, W: int) -> np.ndarray:
    """Window token (l, j) sees the x-block, level-0 tokens 0..j, and levels 1..l of its own column j
    (LookaheadDecoding's j_make_causal_mask_multilevel)."""
    q = k + levels * W
    s = np.zeros((q, q), bool)
    s[:k, :k] = np.tril(np.ones((k, k), bool))
    for l in range(levels):
        for j in range(W):
            r = k + l * W + j
            s[r, :k] = True
            s[r, k:k + j + 1] = True
            for ll in range(1, l + 1):
                s[r, k + ll * W + j] = True
    return s
