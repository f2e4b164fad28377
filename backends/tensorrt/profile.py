"""The engine's optimization profile: a (min, opt, max) shape for every input of a step graph, derived from the
manifest's strategy and target.

The lowering names every dynamic dim of the step's inputs: `batch`; the KV length `past` (`draft_past_len` for a fused
draft's cache); per forward branch `<branch>q` and `<branch>total` (`q`, `verify_q`, `lookahead_total`, `draft_q`,
`x_q`, ...); and the candidate block's `guesses` x `length`. Each gets a range that holds every step the runtime can
feed, from these bounds (S = target.max_seq_len):

- a branch's q is its decode width w (the tokens one step feeds it: `_widths`), or a prefill of up to S tokens plus w;
- the cache holds each row's committed tokens (at most S) plus masked slots: left padding, and holes where a row
  accepted fewer tokens than another. The runtime (dgopt/runtime/slots.py) compacts the holes once they exceed a
  third of the slots, checked at doubling sizes, so the slots stay below 3S before a step adds its own W (the sum
  of the widths): past <= 3S + W (seen: 131 at S = 64 for speculative sampling in a ragged batch of 3);
- a total is past plus every q of the step (merged branches see each other's columns): total <= past_max + sum q_max;
- guesses and length are the strategy's block, from 1 (ngram's length from 0: a step with no match proposes
  nothing).

A dim named otherwise, or a strategy kind without widths, is a BackendError naming it: an engine whose profile
misses a shape the runtime feeds fails at run time, on the GPU, far from the cause."""
from __future__ import annotations

from pathlib import Path

import onnx

from dgopt.errors import BackendError

__all__ = ["profile_shapes", "dim_ranges", "step_widths"]


def step_widths(strategy: dict | None) -> dict[str, int]:
    """Decode width of each forward branch (branch prefix -> tokens one step feeds it), plus `guesses` and
    `length` (the candidate block), from the manifest's `strategy` entry."""
    st = dict(strategy or {"kind": "autoregressive"})
    kind = st.get("kind", "autoregressive")
    if kind == "autoregressive":
        return {"": 1}
    if kind == "lookahead":
        n1 = int(st["ngram"]) - 1
        length = n1 + 1                                  # sampling verifies one more depth (the bonus draw)
        return {"lookahead_": int(st["window"]) * n1 + 1, "verify_": int(st["guesses"]) * n1 + 1,
                "guesses": int(st["guesses"]), "length": length}
    if kind == "jacobi":
        b = int(st["block"])
        return {"verify_": b + 1, "guesses": 1, "length": b + 1}
    if kind in ("speculative", "uag"):
        k = int(st["k_max"] if st.get("k_schedule") == "heuristic" else st["k"]) + 1
        # fused speculative: the draft's catch-up (`draft_`), its chain input (`x_`) and the target's verify;
        # unfused and uag: the verify step (the draft's own step graph is autoregressive: `q`)
        return {"": k, "draft_": k, "x_": k, "verify_": k, "guesses": 1, "length": k + 1}
    if kind == "ngram":     # verify branch alone: up to `guesses` continuations of k (k_max with the heuristic)
        k = int(st["k_max"] if st.get("k_schedule") == "heuristic" else st["k"])
        g = int(st.get("guesses") or 1)
        return {"verify_": g * k + 1, "guesses": g, "length": k + 1}
    if kind == "recycle":   # the verify branch over [x-block, k proposals]; the module chain runs inside the step
        k = int(st["k_max"] if st.get("k_schedule") == "heuristic" else st["k"]) + 1
        return {"verify_": k, "guesses": 1, "length": k + 1}
    raise BackendError(f"tensorrt profile: strategy kind '{kind}' has no step widths (add it to "
                       "backends/tensorrt/profile.py step_widths)")


def _branch(dim: str, suffix: str) -> str | None:
    if dim == suffix:
        return ""
    if dim.endswith("_" + suffix):
        return dim[:-len(suffix)]
    return None


def dim_ranges(dims, strategy: dict | None, max_batch: int, max_seq_len: int, opt_batch: int | None = None,
               opt_past: int | None = None, where: dict | None = None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for each named dim; BackendError on a dim the lowering does not write (`where`: dim -> the
    input that has it, for the message)."""
    where = where or {}
    if max_batch < 1 or max_seq_len < 2:
        raise BackendError(f"tensorrt profile: max_batch must be >= 1 and max_seq_len >= 2 "
                           f"(got {max_batch}, {max_seq_len})")
    S = max_seq_len
    w = step_widths(strategy)
    branches = {k: v for k, v in w.items() if k not in ("guesses", "length")}
    widest = max(branches.values())
    ob = max_batch if opt_batch is None else opt_batch
    op = S // 2 if opt_past is None else opt_past
    if not 1 <= ob <= max_batch or not 0 <= op <= S - 1:
        raise BackendError(f"tensorrt profile: opt point batch={ob}, past={op} is outside batch 1..{max_batch}, "
                           f"past 0..{S - 1}")
    q_of = {}
    for d in dims:
        b = _branch(d, "q")
        if b is not None:
            wd = branches.get(b, widest)
            q_of[d] = (1, min(wd, S + wd), S + wd)
    past_max = 3 * S + sum(branches.values())
    q_sum_max = sum(r[2] for r in q_of.values()) or S + widest
    q_sum_opt = sum(r[1] for r in q_of.values()) or widest
    out = {}
    for d in sorted(dims):
        if d == "batch":
            out[d] = (1, ob, max_batch)
        elif d in q_of:
            out[d] = q_of[d]
        elif d == "past" or d.endswith("_past_len") or d.endswith("_past"):
            out[d] = (0, op, past_max)
        elif _branch(d, "total") is not None:
            out[d] = (1, op + q_sum_opt, past_max + q_sum_max)
        elif d in ("guesses", "length"):
            n = w.get(d)
            if n is None:
                raise BackendError(f"tensorrt profile: input '{where.get(d, '?')}' has dim '{d}', but strategy "
                                   f"'{(strategy or {}).get('kind', 'autoregressive')}' has no {d}")
            # ngram proposes nothing when the context has no match: an empty candidate block
            lo = 0 if d == "length" and (strategy or {}).get("kind") == "ngram" else 1
            out[d] = (lo, n, n)
        else:
            raise BackendError(f"tensorrt profile: input '{where.get(d, '?')}' has dynamic dim '{d}', which is not "
                               "one the lowering writes (batch, past, [<branch>_]q, [<branch>_]total, "
                               "<model>_past_len, guesses, length)")
    return out


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]


def profile_shapes(model: onnx.ModelProto | str | Path, max_batch: int, max_seq_len: int,
                   opt_batch: int | None = None, opt_past: int | None = None,
                   strategy: dict | None = None) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per graph input of `model` (a step graph, or its path): fixed dims stay fixed, named
    ones get `dim_ranges` for the manifest's `strategy` (default autoregressive). The opt point is one decode step
    at half the context and batch opt_batch (default max_batch)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs = [(vi.name, _dims(vi)) for vi in model.graph.input if vi.name not in inits]
    for name, dims in inputs:
        for i, d in enumerate(dims):
            if not (isinstance(d, int) and d > 0) and not isinstance(d, str):
                raise BackendError(f"tensorrt profile: input '{name}' dim {i} has neither a size nor a name")
    where = {}
    for name, dims in inputs:
        for d in dims:
            if isinstance(d, str):
                where.setdefault(d, name)
    ranges = dim_ranges(set(where), strategy, max_batch, max_seq_len, opt_batch, opt_past, where)
    out = {}
    for name, dims in inputs:
        rs = [(d, d, d) if isinstance(d, int) else ranges[d] for d in dims]
        out[name] = tuple(tuple(r[j] for r in rs) for j in range(3))
    return out

