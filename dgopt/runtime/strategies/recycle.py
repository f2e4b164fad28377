"""RecycleGPT, lossless (EAGLE-style): the step graph verifies the k proposals the recyclable module made in the
previous step and runs the module's chain from the accepted position for the next step's proposals (output
`proposals`, fed back as `candidates`). One call per step, no draft cache: the host only carries the proposals.
The first step (prefill) verifies k tokens drawn from the prompt. Sampled: the chain's distributions q come back
as `proposal_probs` and go into the next step's rejection sampling (`draft_probs`); the prefill's guesses are
point masses (one-hot q), which rejection sampling handles exactly like any q. Two noise streams, as speculative's:
the chain's draws and the acceptance tests. verify: false (LOSSY): the input `trusted` says how many proposals are
committed unverified: 0 at prefill, k after.
k_schedule heuristic (greedy): the step's chain is a loop run `draft_k` times; the host asks k + 2 after a step in
which every row accepted every proposal, else k - 1 (within 1..k_max, all rows one k). A step's chain runs before its
own acceptance is known, so the length asked after step s is verified at step s + 2."""
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
        self.k_max, self.k_ask = st.get("k_max", K), K       # k_ask: the chain length the running step is asked
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
            feeds["draft_k"] = np.array(self.k_ask, np.int64)
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
        if self.adaptive:       # this step's outcome sets the length the next step asks of its chain
            K, done = self.cands.shape[-1], self.loop.done
            full = all(m[b] >= K for b in range(len(m)) if not done[b])
            self.k_ask = min(self.k_ask + 2, self.k_max) if full else max(1, self.k_ask - 1)
        self.cands = self.next[:, None, :]
        if self.draft_noise is not None:
            self.q = self.next_q

    def stats(self):
        st = draft_stats(self.loop, self.proposed_n, 0, None)
        if self.lossy:      # acceptance_rate counts unverified tokens: not the target's agreement
            st["lossy"] = True
        return st
