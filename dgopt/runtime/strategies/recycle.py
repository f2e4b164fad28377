"""RecycleGPT, lossless (EAGLE-style): the step graph verifies the k proposals the recyclable module made in the
previous step and runs the module's chain from the accepted position for the next step's proposals (output
`proposals`, fed back as `candidates`). One call per step, no draft cache: the host only carries the proposals.
The first step (prefill) verifies k tokens drawn from the prompt."""
from __future__ import annotations

from .base import Strategy, initial_guesses
from .speculative import draft_stats

__all__ = ["Recycle"]


class Recycle(Strategy):
    def __init__(self, loop):
        super().__init__(loop)
        self.K = K = loop.dec.manifest["strategy"]["k"]
        self.cands = initial_guesses(loop.rows, K)[:, None, :]
        self.proposed_n = 0

    def propose(self, feeds):
        return self.cands, self.K, 1

    def proposed(self, out, cands, K):
        self.next = out["proposals"]
        self.proposed_n += K * (self.loop.B - sum(self.loop.done))
        return cands, K

    def advance(self, m, got):
        self.cands = self.next[:, None, :]

    def stats(self):
        return draft_stats(self.loop, self.proposed_n, 0, None)
