"""Autoregressive decoding: one token per step; the step graph's logits processors and sampler pick it."""
from __future__ import annotations

from .base import Strategy

__all__ = ["Autoregressive"]


class Autoregressive(Strategy):
    ids_name, pos_name, mask_name = "input_ids", "position_ids", "attn_mask"
    commit = "none"
    multi_token = False

    def __init__(self, loop):
        super().__init__(loop)
        B, V = loop.B, loop.dec.vocab_size
        # precomputed noise: a [B] uniform (inverse-CDF sampling) or [B, V] Gumbel noise per step
        self.noise = {name: loop.stream(name, loop.seed, (B,) if name == "uniform" else (B, V), loop.steps_max)
                      for name in ("uniform", "gumbel") if name in loop.sess.inputs}

    @property
    def joinable(self):     # greedy: no per-row state (the noise streams are sized at the call's start)
        return not self.noise

    def propose(self, feeds):
        for name, stream in self.noise.items():
            feeds[name] = stream.next()
        return None, 0, 0

    def accepted(self, out):
        toks = out["next_token"].tolist()
        return [1] * len(toks), [[t] for t in toks]
