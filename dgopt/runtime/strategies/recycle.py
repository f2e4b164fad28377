"""RecycleGPT, lossless (EAGLE-style): the step graph verifies the k proposals the recyclable module made in the
previous step and runs the module's chain from the accepted position for the next step's proposals (output
`proposals`, fed back as `candidates`). One call per step, no draft cache: the host only carries the proposals.
The first step (prefill) verifies k tokens drawn from the prompt. Sampled: the chain's distributions q come back
as `proposal_probs` and go into the next step's rejection sampling (`draft_probs`); the prefill's guesses are
point masses (one-hot q), which rejection sampling handles exactly like any q. Two noise streams, as speculative's:
the chain's draws and the acceptance tests. verify: false (LOSSY): the input `trusted` says how many proposals are
committed unverified: 0 at prefill, k after.
k_schedule heuristic (greedy): the step's chain is a loop whose length the step decides from its own acceptance
(K + 2 after all rows accepted all K, else K - 1); the host only caps it with `draft_k` = k_max and says which rows
are still running (`active_rows`: a finished row's acceptance must not shorten the others' chain)."""
from __future__ import annotations

import numpy as np

from .base import Strategy, draft_stats, initial_guesses

__all__ = ["Recycle"]


class Recycle(Strategy):
    def __init__(self, loop):
        super().__init__(loop)
        st = loop.dec.manifest["strategy"]
        self.K = K = st["k"]
        self.cands = initial_guesses(loop.rows, K)[:, None, :]
        self.adaptive = "draft_k" in loop.sess.inputs
        self.k_max = st.get("k_max", K)
        self.proposed_n = 0
        self.lossy = not loop.dec.manifest["strategy"].get("verify", True)
        self.trusted = np.zeros(loop.B, np.int64)
        self.draft_noise = self.accept_noise = None
        if loop.sampled:
            B, n = loop.B, loop.steps_max
            streams = np.random.SeedSequence(loop.seed).spawn(2)
            self.draft_noise = loop.stream("uniform", streams[0], (B, K), n)
            self.accept_noise = loop.stream("uniform", streams[1], (B, K + 1), n)
            self.q = np.zeros((B, K, loop.dec.vocab_size), np.float32)
            np.put_along_axis(self.q, self.cands[:, 0, :, None], 1.0, axis=2)

    def propose(self, feeds):
        if self.adaptive:
            feeds["draft_k"] = np.array(self.k_max, np.int64)
            feeds["active_rows"] = np.array([0 if d else 1 for d in self.loop.done], np.int64)
            return self.cands, self.cands.shape[-1], 1
        if self.lossy:      # the prefill's guesses come from the prompt: verified; the module's, from then on, not
            feeds["trusted"] = self.trusted
            self.trusted = np.full(self.loop.B, self.K, np.int64)
        if self.draft_noise is not None:
            du = self.draft_noise.next()
            feeds.update({f"draft_uniform_{i}": du[:, i] for i in range(self.K)}, draft_probs=self.q,
                         accept_uniform=self.accept_noise.next())
        return self.cands, self.K, 1

    def proposed(self, out, cands, K):
        self.next = out["proposals"]
        if self.draft_noise is not None:
            self.next_q = out["proposal_probs"]
        self.proposed_n += K * (self.loop.B - sum(self.loop.done))
        return cands, K

    def advance(self, m, got):
        self.cands = self.next[:, None, :]
        if self.draft_noise is not None:
            self.q = self.next_q

    def stats(self):
        st = draft_stats(self.loop, self.proposed_n, 0, None)
        if self.lossy:      # acceptance_rate counts unverified tokens: not the target's agreement
            st["lossy"] = True
        return st
