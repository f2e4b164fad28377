"""The interface between the one decode loop (dgopt/runtime/loop.py) and a strategy's own part of it.

The loop owns what every strategy shares: the x-block (the committed tokens whose KV is not cached yet: the prompt
at prefill, then each row's last accepted token), the target's KV slots and their commit, the verify block's
positions and mask, stopping (EOS, max_new_tokens, max_seq_len, cancelled rows), streaming, the repetition
penalty's `seen`, noise streams, timing and the common stats. A strategy says, per step:

  propose(feeds)    before the call: its candidates [B, G, K] for the verify block (None when the step graph makes
                    them itself, as a fused draft chain does), K and G, and any inputs of its own added to `feeds`
  proposed(out, ..) after the call: the candidates the step verified (a fused chain reports them as an output)
  accepted(out)     each row's accepted length and token chain, as Python ints
  advance(m, got)   after the loop committed the tokens: carry state to the next step (window, pool, draft cache,
                    guesses, adaptive k)
  stats()           its own stats, merged into the loop's
  joinable, joined  continuous batching: whether rows may join a running call, and what to do when they did

Everything per row is a Python int or list where the loop hands it over: between onnxruntime calls the
interpreter's working set is cold, and a few Python-int operations per row cost less than [B]-array numpy calls."""
from __future__ import annotations

import numpy as np

__all__ = ["Strategy", "initial_guesses", "draft_stats"]


class Strategy:
    # the verify block's inputs in the step graph (autoregressive: the model's own names)
    ids_name, pos_name, mask_name = "verify_ids", "verify_position_ids", "verify_mask"
    # how rejected candidates leave the target's cache: "holes" (they stay as masked slots, compacted rarely),
    # "gather" (the best guess's accepted prefix is moved behind the x-block: most slots are guesses), "none"
    commit = "holes"
    multi_token = True      # stats: accepted lengths per step

    def __init__(self, loop):
        self.loop = loop

    def propose(self, feeds: dict) -> tuple[np.ndarray | None, int, int]:
        raise NotImplementedError

    def proposed(self, out: dict, cands: np.ndarray | None, K: int) -> tuple[np.ndarray | None, int]:
        return cands, K

    def accepted(self, out: dict) -> tuple[list[int], list[list[int]]]:
        return out["accept_len"].tolist(), out["accept_tokens"].tolist()

    def advance(self, m: list[int], got: list[list[int] | None]) -> None:
        pass

    def stats(self) -> dict:
        return {}

    # continuous batching: whether rows may join a running call (Loop._join), and the hook after they did
    joinable = False

    def joined(self) -> None:
        pass


def initial_guesses(rows: list[list[int]], size: int) -> np.ndarray:
    """[B, size] tokens drawn from each prompt, seeded: repeatable runs."""
    rng = np.random.default_rng(0)
    return np.stack([rng.choice(np.array(r), size=size) for r in rows]).astype(np.int64)


def draft_stats(loop, proposed: int, draft_compactions: int, t_draft: float | None) -> dict:
    """Acceptance and cache stats of a drafting strategy (speculative, uag)."""
    hist = loop.hist
    stats = {"acceptance_rate": round(sum((a - 1) * c for a, c in hist.items()) / max(proposed, 1), 4),
             "mean_k": round(proposed / max(sum(hist.values()), 1), 3),     # proposals per row and step
             # rejected proposals stay in the caches as masked slots until they make up a third: then one gather
             "cache_compactions": loop.slots.compactions + draft_compactions}
    if t_draft is None:     # draft and target run in one call: no split of the time
        stats["fused"] = True
    else:
        stats["draft_s"], stats["target_s"] = round(t_draft, 6), round(loop.elapsed - t_draft, 6)
    return stats
