"""Jacobi decoding (CLLM's jacobi_forward): guess a block of K tokens, verify it in one causal forward after the
x-block; the accepted prefix is the model's own argmax chain (plus one bonus token). The next guess: the rest of the
chain, shifted (`guess: chain`), or with `guess: ngram` the continuation of the longest context suffix that
occurred before (dgopt/runtime/ngram_index.py) with the rest of the chain behind it, so that text which repeats
itself is guessed whole. Sampled: the draws at each verified depth are matched against the guess."""
from __future__ import annotations

from ..ngram_index import row_indexes
from .base import Strategy, initial_guesses

__all__ = ["Jacobi"]


class Jacobi(Strategy):
    commit = "gather"

    def __init__(self, loop):
        super().__init__(loop)
        st = loop.dec.manifest["strategy"]
        self.K = K = st["block"]
        self.guess = initial_guesses(loop.rows, K)
        self.index = None
        if st.get("guess", "chain") == "ngram":     # artifacts compiled before the field: chain
            self.index = row_indexes(loop.rows, st)
            for b, ix in enumerate(self.index):
                p = ix.propose(K)
                if p:
                    self.guess[b, :len(p[0])] = p[0]
        self.uniform = loop.stream("uniform", loop.seed, (loop.B, K + 1), loop.steps_max) if loop.sampled else None

    def propose(self, feeds):
        if self.uniform is not None:
            feeds["depth_uniform"] = self.uniform.next()
        return self.guess[:, None, :], self.K, 1

    def proposed(self, out, cands, K):
        self.chain = out["accept_tokens"]
        return cands, K

    def advance(self, m, got):
        K, last, index = self.K, self.loop.x_ids[:, 0], self.index
        for b in range(self.loop.B):
            g = self.chain[b, m[b] + 1:].tolist()
            if index is not None and got[b] is not None:
                index[b].extend(got[b])
                p = index[b].propose(K)
                if p:
                    g = p[0] + g
            self.guess[b] = (g + [g[-1] if g else int(last[b])] * K)[:K]
