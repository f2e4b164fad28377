"""Jacobi decoding (CLLM's jacobi_forward): guess a block of K tokens, verify it in one causal forward after the
x-block; the accepted prefix is the model's own argmax chain (plus one bonus token), and the rest of the chain,
shifted, is the next guess. Sampled: the draws at each verified depth are matched against the guess."""
from __future__ import annotations

from .base import Strategy, initial_guesses

__all__ = ["Jacobi"]


class Jacobi(Strategy):
    commit = "gather"

    def __init__(self, loop):
        super().__init__(loop)
        self.K = K = loop.dec.manifest["strategy"]["block"]
        self.guess = initial_guesses(loop.rows, K)
        self.uniform = loop.stream("uniform", loop.seed, (loop.B, K + 1), loop.steps_max) if loop.sampled else None

    def propose(self, feeds):
        if self.uniform is not None:
            feeds["depth_uniform"] = self.uniform.next()
        return self.guess[:, None, :], self.K, 1

    def proposed(self, out, cands, K):
        self.chain = out["accept_tokens"]
        return cands, K

    def advance(self, m, got):
        K, last = self.K, self.loop.x_ids[:, 0]
        for b in range(self.loop.B):
            rest = self.chain[b, m[b] + 1:].tolist()
            self.guess[b] = (rest + [rest[-1] if rest else int(last[b])] * K)[:K]
