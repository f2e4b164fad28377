"""N-gram drafting (prompt lookup): each row's proposals are continuations of the longest suffix of its context
(prompt + committed tokens, behind an optional document) that occurred before, from an incremental n-gram index
(dgopt/runtime/ngram_index.py); the step verifies them after the x-block, with no draft model and no lookahead
branch. Greedy with one guess: as many candidates as the match gave (the step graph reads K off their shape; no
match: a step of one position, an autoregressive step) and rejected ones stay as masked holes. Several guesses, or
sampling (draws matched per depth, a fixed width): G x k candidates, the best guess's prefix gathered."""
from __future__ import annotations

import numpy as np

from ..ngram_index import row_indexes
from .base import Strategy

__all__ = ["Ngram", "document_ids"]


def document_ids(dec) -> list[int] | None:
    """The document searched before every row's context: `dec.document` (token ids) when set, else the artifact's
    (strategy.document, compiled in as text), encoded once."""
    doc = getattr(dec, "document", None)
    rel = dec.manifest["strategy"].get("document")
    if doc is None and rel:
        doc = dec.document = dec.encode((dec.path / rel).read_text())
    return doc


class Ngram(Strategy):
    def __init__(self, loop):
        super().__init__(loop)
        st = loop.dec.manifest["strategy"]
        self.K, self.G = st["k"], st["guesses"]
        self.varies = not loop.sampled and self.G == 1
        # k_schedule heuristic (greedy, one guess): each row's k grows by 2 after a step that accepted its whole
        # proposal, else shrinks by 1, within 1..k_max (transformers' schedule for assisted generation)
        self.adapt = st.get("k_schedule") == "heuristic"
        self.k_max = st["k_max"]
        self.k = [self.K] * loop.B
        self.commit = "holes" if self.varies else "gather"
        # the repetition penalty's lowering takes no empty candidate: a step without a match verifies one stand-in
        self.least = int("seen" in loop.sess.inputs)
        doc = document_ids(loop.dec)
        self.index = row_indexes(loop.rows, st, doc)
        self.uniform = loop.stream("uniform", loop.seed, (loop.B, self.K + 1), loop.steps_max) \
            if loop.sampled else None
        self.proposed_n = self.accepted_n = 0

    def propose(self, feeds):
        loop, K, G = self.loop, self.K, self.G
        done, last = loop.done, loop.x_ids[:, -1].tolist()
        props = [[] if done[b] else ix.propose(self.k[b], G) for b, ix in enumerate(self.index)]
        self.n = [len(p[0]) if p else 0 for p in props]
        self.nmax = [max(map(len, p)) if p else 0 for p in props]      # the padding behind them is no proposal
        self.proposed_n += sum(sum(map(len, p)) for p in props)          # every guess's own tokens
        if self.varies:
            n = max(max(len(p[0]) if p else 0 for p in props), self.least)
            rows = [(p[0] if p else []) for p in props]
            return np.array([[r + [t] * (n - len(r))] for r, t in zip(rows, last)], np.int64), n, 1
        if self.uniform is not None:
            feeds["depth_uniform"] = self.uniform.next()
        cands = [[(p[g] if g < len(p) else p[0] if p else []) for g in range(G)] for p in props]
        return np.array([[c + [t] * (K - len(c)) for c in row] for row, t in zip(cands, last)], np.int64), K, G

    def accepted(self, out):
        alen, chain = super().accepted(out)
        self.accepted_n += sum(min(a - 1, n) for a, n, d in zip(alen, self.nmax, self.loop.done) if not d)
        return alen, chain

    def advance(self, m, got):
        for ix, g in zip(self.index, got):
            if g is not None:
                ix.extend(g)
        if self.adapt:
            for b, n in enumerate(self.n):
                if n:
                    self.k[b] = min(self.k[b] + 2, self.k_max) if m[b] >= n else max(self.k[b] - 1, 1)

    def stats(self):
        loop = self.loop
        rows_steps = max(sum(loop.hist.values()), 1)
        return {"acceptance_rate": round(self.accepted_n / max(self.proposed_n, 1), 4),
                "mean_k": round(self.proposed_n / rows_steps, 3)} if loop.steps else {}
