"""How many tokens per target forward can a draft give at best? Teacher-forced along the target's own greedy
outputs (accepted tokens always equal them, so the draft's context is always that prefix): the draft's top-1/2/3
agreement per position, and the tokens per target forward of a k-token chain, of a chain with each depth's second
choice as an extra leaf, and of a full binary tree of depth k, with the number of tokens each verify forward holds.
Deterministic (no timing): compare with benchmarks/strategies.py's measured tokens/step.

    python benchmarks/draft_ceiling.py --draft code-draft-kd
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prompts_for  # noqa: E402


def simulate(chain_hits, extra_hits, k: int, sibling: bool) -> float:
    """Walk each output: at position t accept consecutive chain hits (at most k), then optionally one extra leaf at
    the first miss, then the target's bonus token."""
    steps = toks = 0
    for hc, hs in zip(chain_hits, extra_hits):
        t, n = 0, len(hc)
        while t < n:
            a = 0
            while a < k and t + a < n and hc[t + a]:
                a += 1
            extra = int(sibling and a < k and t + a < n and bool(hs[t + a]))
            t += a + extra + 1
            toks += a + extra + 1
            steps += 1
    return toks / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="code-tiny")
    ap.add_argument("--draft", default="code-draft-kd")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new", type=int, default=96)
    a = ap.parse_args()
    from dgopt.models.hf import load_model
    from dgopt.spec import spec_from_dict
    load = lambda n: load_model(spec_from_dict({"model": {"name": n}}).model, lambda p: Path(p))  # noqa: E731
    tgt, dft = load(a.model), load(a.draft)
    hits = {1: [], 2: [], 3: []}
    for p in prompts_for(tgt, a.prompts):
        ids = torch.tensor([p])
        with torch.no_grad():
            seq = tgt.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new,
                                     do_sample=False, pad_token_id=0)[0]
            top = dft.model(seq[None]).logits[0].topk(3, -1).indices       # draft's guesses for position i + 1
        hit = top[len(p) - 1:len(seq) - 1] == seq[len(p):, None]
        for n in hits:
            hits[n].append(hit[:, :n].any(1).numpy())
    agree = {n: float(np.concatenate(h).mean()) for n, h in hits.items()}
    print(f"{a.draft} vs {a.model}, {a.prompts} prompts x {a.new} greedy tokens: top-1/2/3 agreement "
          f"{agree[1]:.3f} / {agree[2]:.3f} / {agree[3]:.3f}")
    print(f"{'k':>3s} {'chain':>8s} {'+siblings':>10s} {'binary tree':>12s}   (tokens per target forward; "
          "verified tokens per forward in brackets)")
    for k in (1, 2, 3, 4, 5):
        print(f"{k:3d} {simulate(hits[1], hits[1], k, False):6.2f}({k + 1}) "
              f"{simulate(hits[1], hits[2], k, True):7.2f}({2 * k + 1}) "
              f"{simulate(hits[2], hits[2], k, False):8.2f}({2 ** (k + 1) - 1})")


if __name__ == "__main__":
    main()
