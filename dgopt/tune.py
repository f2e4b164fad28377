"""`dgopt tune`: pick a strategy's configuration by measuring it on this machine.

A multi-token step verifies several positions in one forward; what a step over q positions costs depends on the
machine (on a 2-core CPU it grows with q, on a GPU it is nearly flat up to the roofline knee), so the configuration
that pays (lookahead W/N/G, ngram k/guesses, speculative k, jacobi block) does too. Tune measures
  (a) the cost curve: one step's time over q = 1, 2, 4, ... 64 new positions after a fixed past, and
  (b) each candidate configuration's tokens/s on sample prompts, in a block right after a block of autoregressive
      decoding of the same prompts (this machine's speed drifts over minutes: a ratio of adjacent blocks cancels it),
and writes the fastest as a spec, or the autoregressive spec when no configuration beats autoregressive by the
margin: it never recommends a slower configuration. A configuration whose best case (every proposal accepted) the
cost curve already puts below autoregressive is skipped without compiling it.
  (c) the chosen configuration again at batch 2, 4, 8 (up to target.max_batch), each against autoregressive at the
      same batch (the mean of two block pairs): from the first batch where it is slower, calls run autoregressive
      decoding
      (strategy.draft_max_batch: the largest batch measured that still paid; 1 when batch 2 did not).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .errors import DgoptError
from .spec import Spec, load_spec

log = logging.getLogger("dgopt.tune")
__all__ = ["tune", "candidates", "Candidate", "Measured", "TuneReport", "MARGIN", "COST_POSITIONS", "BATCHES"]

MARGIN = 1.03               # a configuration must beat autoregressive by 3 % (above this machine's block-to-block noise)
COST_POSITIONS = (1, 2, 4, 8, 16, 32, 64)
BATCHES = (2, 4, 8)         # batch sizes the chosen configuration is timed at (up to target.max_batch)


@dataclass
class Candidate:
    name: str
    strategy: dict               # the spec's strategy section
    positions: int               # positions one decode step verifies (at most)
    best_case: float             # tokens one step commits at most


@dataclass
class Measured:
    candidate: Candidate
    tokens_per_s: float | None = None
    ratio: float | None = None           # tokens/s over the adjacent autoregressive block's
    tokens_per_step: float | None = None
    ms_per_step: float | None = None
    note: str = ""


@dataclass
class TuneReport:
    chosen: Candidate
    rows: list[Measured]
    cost_ms: dict[int, float]
    machine: str
    autoregressive_tokens_per_s: float
    seconds: float
    spec: dict = field(default_factory=dict)
    plot: Path | None = None           # the PNG written (None: no plot, e.g. without matplotlib)
    batch_rows: list[tuple[int, Measured]] = field(default_factory=list)   # the chosen config at batch > 1
    draft_max_batch: int = 0           # what the batch rows set (0: the chosen config paid at every batch timed)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return f"{cpu}, {os.cpu_count()} cores"


def candidates(spec: Spec, kinds: list[str] | None = None) -> list[Candidate]:
    """The configurations tried for the spec's kind (and `kinds`), the spec's own first."""
    st = spec.strategy
    kinds = kinds or [st.kind]
    out: list[Candidate] = []

    def add(name, strategy, positions, best):
        if all(c.strategy != strategy for c in out):
            out.append(Candidate(name, strategy, positions, best))

    # without the spec's draft_max_batch: a candidate compiled with a fallback would time autoregressive decoding
    # at the batches tune measures it at (the batch rows set the field again)
    own = st.model_dump(mode="json", exclude_none=True, exclude={"draft_max_batch"})
    for kind in kinds:
        if kind == "lookahead":
            grid = [(st.window, st.ngram, st.guesses)] if st.kind == "lookahead" else []
            grid += [(5, 4, 5), (4, 3, 4), (3, 3, 2), (4, 2, 4), (2, 2, 2), (2, 3, 1)]
            for W, N, G in grid:
                add(f"lookahead W{W} N{N} G{G}", {**own, "kind": "lookahead", "window": W, "ngram": N, "guesses": G},
                    1 + (W + G) * (N - 1), N)
        elif kind == "ngram":
            grid = [(st.k, st.guesses)] if st.kind == "ngram" else []
            grid += [(2, 1), (3, 1), (4, 1), (6, 1), (8, 1), (3, 2), (2, 3)]
            for k, G in grid:
                add(f"ngram k{k} G{G}", {**own, "kind": "ngram", "k": k, "guesses": G, "k_schedule": "constant"},
                    1 + G * k, k + 1)
            if spec.sampling.kind == "greedy":      # adaptive k: one guess of varying length, greedy only
                for k, km in ((2, 8), (3, 12)):
                    add(f"ngram heuristic k{k}..{km}", {**own, "kind": "ngram", "k": k, "guesses": 1,
                                                         "k_schedule": "heuristic", "k_max": km}, 1 + km, km + 1)
        elif kind == "jacobi":
            for n in ([st.block] if st.kind == "jacobi" else []) + [2, 4, 8]:
                add(f"jacobi block {n}", {**own, "kind": "jacobi", "block": n}, 1 + n, n + 1)
        elif kind in ("speculative", "uag"):
            if spec.draft is None:
                raise DgoptError(f"tune: strategy {kind} needs the spec's draft model")
            base = {**own, "kind": kind, "k_schedule": "constant", "confidence": 0.0}
            if st.kind == kind:
                add(f"{kind} (the spec's)", {**own, "kind": kind}, 1 + st.k_max if st.draft_loop else 1 + st.k,
                    (st.k_max if st.draft_loop else st.k) + 1)
            for k in (1, 2, 3, 4, 6):
                add(f"{kind} k{k}", {**base, "k": k}, 1 + k, k + 1)
            if spec.sampling.kind == "greedy":      # variable-length chains are greedy only
                for km, conf in ((6, 0.0), (8, 0.4), (6, 0.4)):
                    add(f"{kind} heuristic k3..{km}{f' conf {conf}' if conf else ''}",
                        {**base, "k": 3, "k_schedule": "heuristic", "k_max": km, "confidence": conf}, 1 + km, km + 1)
        elif kind == "recycle":
            if spec.recycle is None:
                raise DgoptError("tune: strategy recycle needs the spec's recycle module")
            if st.kind == "recycle" and st.k_schedule == "heuristic":
                add(f"recycle heuristic k{st.k}..{st.k_max} (the spec's)", {**own, "kind": "recycle"}, 1 + st.k_max,
                    st.k_max + 1)
            base = {**own, "kind": "recycle", "k_schedule": "constant"}
            for k in ([st.k] if st.kind == "recycle" else []) + [1, 2, 3, 4, 6]:
                add(f"recycle k{k}", {**base, "k": k}, 1 + k, k + 1)
            if spec.sampling.kind == "greedy" and st.verify:     # a chain of varying length: greedy only
                for km in (6, 8, 10):
                    add(f"recycle heuristic k3..{km}", {**base, "k": 3, "k_schedule": "heuristic", "k_max": km},
                        1 + km, km + 1)
        elif kind != "autoregressive":
            raise DgoptError(f"tune: no configurations to try for strategy '{kind}'")
    return out


def default_prompts(dec, n: int = 6, tokens: int = 128) -> list[list[int]]:
    """Held-out corpus text (the validation split of the stdlib corpus the project's models train on): the `tokens`
    tokens before the middle of n files; random ids with repeats for a model without a tokenizer."""
    if dec.manifest.get("tokenizer"):
        from .models.corpus import corpus_files, is_validation, read_file
        out = []
        for f in corpus_files():
            if not is_validation(f.key):
                continue
            text = read_file(f)
            if len(text) < 40 * tokens:         # ~4 characters a token: files of >= 10 prompts' length
                continue
            ids = dec.encode(text[len(text) // 2 - 12 * tokens:len(text) // 2])       # the middle's text only
            if len(ids) >= 2 * tokens:
                out.append(ids[-tokens:])
            if len(out) == n:
                return out
        if out:
            return out
    import random
    rng = random.Random(0)
    V = dec.vocab_size
    return [[rng.randrange(min(V, 64)) for _ in range(rng.randint(8, 24))] for _ in range(n)]


def read_prompts(path: str | Path, dec) -> list[list[int]]:
    """--prompts FILE: a JSON list of strings (or of token-id lists), JSON lines, or plain text with one prompt per
    line ('\\n' escapes a newline)."""
    p = Path(path)
    if not p.is_file():
        raise DgoptError(f"--prompts {path}: file not found")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            items = json.loads(text)
        elif p.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
            items = [i["prompt"] if isinstance(i, dict) else i for i in items]
        else:
            items = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DgoptError(f"--prompts {path}: {e}") from None
    if not isinstance(items, list) or not items:
        raise DgoptError(f"--prompts {path}: no prompts")
    out = []
    for it in items:
        if isinstance(it, str):
            if not dec.manifest.get("tokenizer"):
                raise DgoptError(f"--prompts {path}: text prompts need a model with a tokenizer; give token-id lists")
            out.append(dec.encode(it))
        elif isinstance(it, list) and it and all(isinstance(t, int) and 0 <= t < dec.vocab_size for t in it):
            out.append(it)
        else:
            raise DgoptError(f"--prompts {path}: each prompt must be a string or a non-empty list of token ids < "
                             f"{dec.vocab_size}")
    return out


def cost_curve(dec, positions=COST_POSITIONS, past: int = 128, repeats: int = 9) -> dict[int, float]:
    """Milliseconds of one step of the autoregressive step graph over q new positions after `past` cached ones: the
    machine's price of verifying more positions per forward. The sizes are timed in turn, `repeats` rounds, and each
    keeps its fastest: on a shared machine other processes only ever add time (measured here under a load of 16 on
    2 cores: medians of one size swung 2-20x between runs, minima stayed within ~1.5x)."""
    import numpy as np
    sess = dec.session
    cache = sess.new_cache(1)
    ids = np.full((1, past), 1, np.int64)
    mask = np.zeros((1, 1, past, past), np.float32)
    mask[0, 0] = np.where(np.tril(np.ones((past, past), bool)), 0.0, np.finfo(np.float32).min)
    _, cache = sess.run({"input_ids": ids, "position_ids": np.arange(past)[None], "attn_mask": mask}, cache)
    runs = {}
    for q in positions:
        if past + q > dec.max_seq_len:
            break
        feeds = {"input_ids": np.ones((1, q), np.int64), "position_ids": np.arange(past, past + q)[None],
                 "attn_mask": np.concatenate([np.zeros((1, 1, q, past), np.float32),
                                              mask[:, :, :q, :q] if q <= past else np.zeros((1, 1, q, q))], 3)}
        if "seen" in sess.inputs:
            feeds["seen"] = np.zeros((1, dec.vocab_size), np.float32)
        for name in ("uniform", "gumbel"):
            if name in sess.inputs:
                feeds[name] = np.full((1,) if name == "uniform" else (1, dec.vocab_size), 0.5, np.float32)
        sess.run(feeds, cache)                                    # warm (shapes)
        runs[q] = feeds
    best = {q: math.inf for q in runs}
    for _ in range(repeats):
        for q, feeds in runs.items():
            t = time.perf_counter()
            sess.run(feeds, cache)
            best[q] = min(best[q], 1e3 * (time.perf_counter() - t))
    return best


def _interp(cost: dict[int, float], q: int) -> float:
    ks = sorted(cost)
    if q <= ks[0]:
        return cost[ks[0]]
    for a, b in zip(ks, ks[1:]):
        if q <= b:
            return cost[a] + (cost[b] - cost[a]) * (q - a) / (b - a)
    a, b = ks[-2], ks[-1]
    return cost[b] + (cost[b] - cost[a]) * (q - b) / (b - a)


def run_block(dec, prompts, new: int, batch: int = 1) -> tuple[int, float, int]:
    """(tokens, seconds, steps) of generating `new` tokens after each prompt, in calls of `batch` rows (the prompts
    repeated to fill whole calls)."""
    rows = [prompts[i % len(prompts)] for i in range(batch * math.ceil(len(prompts) / batch))]
    toks = steps = 0
    t = time.perf_counter()
    for i in range(0, len(rows), batch):
        r = dec.generate(rows[i:i + batch], max_new_tokens=new)
        toks += sum(len(ids) for ids in r.ids)
        steps += r.stats["steps"]
    return toks, time.perf_counter() - t, steps


# host-side parameters: the step graph does not depend on them (one greedy ngram guess reads its length off the
# candidates' shape), so configurations that differ in them share one compiled artifact
def _graph_key(strategy: dict, sampled: bool) -> str:
    s = dict(strategy)
    if s["kind"] == "ngram" and s.get("guesses", 1) == 1 and not sampled:
        for k in ("k", "min_ngram", "max_ngram", "k_schedule", "k_max"):
            s.pop(k, None)
    return json.dumps(s, sort_keys=True)


def tune(spec: str | Path | dict, out: str | Path, prompts: str | Path | None = None, minutes: float = 4.0,
         kinds: list[str] | None = None, new: int = 64, threads: int | None = None, plot: str | Path | None = None,
         overrides: list[str] | None = None, progress: bool = True,
         measure: Callable[[Candidate, object, list, int], Measured] | None = None,
         cost: Callable[[object], dict[int, float]] | None = None, batches=BATCHES) -> TuneReport:
    """Measure the candidate configurations and write the fastest (or autoregressive) as the spec `out`.
    `measure(candidate, dec, prompts, batch)` and `cost(dec)` replace the timings (tests inject them); `minutes`
    bounds the measuring of candidates: those not reached in time are listed as not measured. `batches`: the batch
    sizes the chosen configuration is timed at to set its strategy.draft_max_batch (empty: none)."""
    import dgopt
    t_start = time.perf_counter()
    if isinstance(spec, dict):
        from .spec import spec_from_dict
        sp, src = spec_from_dict(copy.deepcopy(spec)), None
    else:
        sp, src = load_spec(spec, overrides), Path(spec)
    raw = _raw_spec(spec, overrides)
    if raw.get("graph") is not None:
        raise DgoptError("tune: this spec gives an explicit graph, not a strategy to tune")
    if minutes <= 0:
        raise DgoptError(f"tune: --minutes must be > 0, got {minutes:g}")
    if new < 1:
        raise DgoptError(f"tune: --new-tokens must be >= 1, got {new}")
    if Path(out).is_dir():
        raise DgoptError(f"tune: -o {out}: is a directory; name the tuned spec file to write")
    if prompts and not Path(prompts).is_file():
        raise DgoptError(f"--prompts {prompts}: file not found")
    if any(b < 2 for b in batches or ()):
        raise DgoptError(f"tune: --batches must be >= 2 (batch 1 is what every configuration is timed at), got "
                         f"{min(batches)}")
    cands = candidates(sp, kinds)
    sampled = sp.sampling.kind == "sample"
    work = Path(tempfile.mkdtemp(prefix="dgopt-tune-"))
    try:

        def compiled(strategy: dict, name: str):
            d = _for_strategy(raw, strategy)
            return dgopt.load(dgopt.compile(_absolute(d, sp), work / name, opt_level=2), threads=threads)

        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 150)
        over = sorted({b for b in batches or () if b > sp.target.max_batch})
        if over:
            log.warning("--batches %s: above the spec's target.max_batch %d, not timed", over, sp.target.max_batch)
        batches = sorted({b for b in batches or () if b <= sp.target.max_batch})
        steps_total = 2 + len(cands) + len(batches)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, disable=not progress, transient=True) as bar:
            task = bar.add_task("compiling autoregressive", total=steps_total)
            ar = compiled({"kind": "autoregressive"}, "autoregressive")
            bar.update(task, advance=1, description="measuring the cost curve")
            cost_ms = (cost or cost_curve)(ar)
            bar.update(task, advance=1)
            ps = read_prompts(prompts, ar) if prompts else default_prompts(ar)
            ar_tps: list[float] = []
            if measure is None:
                ar.generate(ps[0], max_new_tokens=8)                  # warm-up
                toks, secs, _ = run_block(ar, ps, new)
                ar_tps.append(toks / secs)
            rows: list[Measured] = []
            decs: dict[str, object] = {}
            deadline = t_start + 60 * minutes
            for c in cands:
                bar.update(task, description=f"measuring {c.name}")
                bound = c.best_case * _interp(cost_ms, 1) / _interp(cost_ms, c.positions)
                if bound < MARGIN:
                    rows.append(Measured(c, note=f"skipped: at most {bound:.2f}x autoregressive by the cost curve"))
                elif time.perf_counter() > deadline:
                    rows.append(Measured(c, note=f"not measured: --minutes {minutes:g} used up"))
                else:
                    key = _graph_key(c.strategy, sampled)
                    if key not in decs:
                        decs[key] = compiled(c.strategy, f"c{len(decs)}")
                    dec = decs[key]
                    host = {k: v for k, v in c.strategy.items() if k != "document"}   # (the artifact has its copy)
                    dec.manifest["strategy"] = {**dec.manifest["strategy"], **host}         # host-side parameters
                    if measure is not None:
                        m = measure(c, dec, ps, 1)
                    else:
                        m = _measure(c, dec, ar, ps, new)
                        ar_tps.append(m.tokens_per_s / m.ratio)
                    rows.append(m)
                bar.update(task, advance=1)
            timed = [r for r in rows if r.ratio is not None]
            confirmed: list[Measured] = []
            # one block pair can be a fluke on a shared machine: the leader is timed against autoregressive once more
            # and keeps the lower of its two ratios; a leader that falls back makes room for the next (3 tries), and
            # only a confirmed config can be chosen
            for _ in range(3):
                best = max(timed, key=lambda r: r.ratio, default=None)
                if best is None or best.ratio < MARGIN or any(best is c for c in confirmed):
                    break
                confirmed.append(best)
                bar.update(task, description=f"confirming {best.candidate.name}")
                dec = decs[_graph_key(best.candidate.strategy, sampled)]
                dec.manifest["strategy"] = {**dec.manifest["strategy"], **{
                    k: v for k, v in best.candidate.strategy.items() if k != "document"}}
                again = measure(best.candidate, dec, ps, 1) if measure is not None else \
                    _measure(best.candidate, dec, ar, ps, new)
                if again.ratio < best.ratio:
                    best.note = f"confirmation run: {again.ratio:.2f}x (first {best.ratio:.2f}x); the lower counts"
                    best.ratio, best.tokens_per_s = again.ratio, again.tokens_per_s
                else:
                    best.note = f"confirmed: {again.ratio:.2f}x in a second run"
            best = max(confirmed, key=lambda r: r.ratio, default=None)
            if best is not None and best.ratio >= MARGIN:
                chosen = best.candidate
            else:
                chosen = Candidate("autoregressive", {"kind": "autoregressive"}, 1, 1)
            batch_rows, limit = [], 0
            if chosen.strategy["kind"] != "autoregressive" and sp.target.backend == "onnx" and batches:
                dec = decs[_graph_key(chosen.strategy, sampled)]
                dec.manifest["strategy"] = {**dec.manifest["strategy"], **{
                    k: v for k, v in chosen.strategy.items() if k != "document"}}
                paid = 1
                # at least 16 rows a block (the prompts repeated), and two block pairs averaged: a batch call is
                # cheap, and one pair of 6 rows swung by +-10% here
                ps_b = [ps[i % len(ps)] for i in range(max(16, len(ps)))]
                for B in batches:
                    bar.update(task, description=f"measuring {chosen.name} at batch {B}")
                    if measure is not None:
                        m = measure(chosen, dec, ps_b, B)
                    else:
                        m, again = (_measure(chosen, dec, ar, ps_b, new, B) for _ in range(2))
                        m.note = f"{m.ratio:.2f}x and {again.ratio:.2f}x in two runs: their mean"
                        m.ratio, m.tokens_per_s = (m.ratio + again.ratio) / 2, (m.tokens_per_s + again.tokens_per_s) / 2
                    batch_rows.append((B, m))
                    bar.update(task, advance=1)
                    if m.ratio < 1.0:   # slower than autoregressive at B: larger calls fall back (larger batches
                        limit = paid    # only widen the gap: not measured)
                        break
                    paid = B
                if limit:
                    chosen.strategy = {**chosen.strategy, "draft_max_batch": limit}
            elif chosen.strategy["kind"] != "autoregressive" and sp.strategy.draft_max_batch:
                # no batch timed (--batches none, max_batch 1): the spec's own limit stands
                chosen.strategy = {**chosen.strategy, "draft_max_batch": sp.strategy.draft_max_batch}
        report = TuneReport(chosen, rows, cost_ms, machine(),
                            statistics.median(ar_tps) if ar_tps else float("nan"), time.perf_counter() - t_start,
                            batch_rows=batch_rows, draft_max_batch=limit)
        report.spec = _write(raw, report, Path(out), src, sp)
        if plot:
            try:
                save_plot(report, plot)
                report.plot = Path(plot)
            except ImportError:     # the spec and table are the result; the plot is optional (not in the core deps)
                log.warning("plot not written: matplotlib is not installed (pip install matplotlib, or dgopt[bench])")
        return report
    finally:    # the compiled candidates are hundreds of MB: never leave them behind
        shutil.rmtree(work, ignore_errors=True)


def _measure(c: Candidate, dec, ar, prompts, new: int, batch: int = 1) -> Measured:
    dec.generate([prompts[0]] * batch, max_new_tokens=8)          # warm-up
    ta, sa, _ = run_block(ar, prompts, new, batch)
    tc, sc, steps = run_block(dec, prompts, new, batch)
    tps, ar_tps = tc / sc, ta / sa
    return Measured(c, tps, tps / ar_tps, tc / steps, 1e3 * sc / steps)


def _for_strategy(raw: dict, strategy: dict) -> dict:
    """The spec with this strategy; the draft model (the recyclable module) only where the strategy uses one."""
    d = {k: v for k, v in raw.items() if k not in ("tuned", "graph")}
    d["strategy"] = dict(strategy)
    if strategy["kind"] not in ("speculative", "uag"):
        d.pop("draft", None)
    if strategy["kind"] != "recycle":
        d.pop("recycle", None)
    return d


def _raw_spec(spec, overrides) -> dict:
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    from .spec import apply_overrides
    return apply_overrides(yaml.safe_load(Path(spec).read_text()), overrides or [])


def _absolute(d: dict, sp: Spec) -> dict:
    """Paths in the spec made absolute (the tuned spec may be written elsewhere; artifacts compile in a temp dir)."""
    d = copy.deepcopy(d)
    for sec in ("model", "draft", "recycle"):
        if isinstance(d.get(sec), dict) and d[sec].get("path"):
            d[sec]["path"] = str(sp.resolve(d[sec]["path"]).resolve())
    st = d.get("strategy") or {}
    if st.get("document"):
        st["document"] = str(sp.resolve(st["document"]).resolve())
    return d


def _write(raw: dict, rep: TuneReport, out: Path, src: Path | None, sp: Spec) -> dict:
    d = _absolute(_for_strategy(raw, rep.chosen.strategy), sp)
    chosen = next((r for r in rep.rows if r.candidate is rep.chosen), None)
    d["tuned"] = {"by": "dgopt tune", "machine": rep.machine, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                  time.gmtime()),
                  "from": str(src) if src else None, "chosen": rep.chosen.name,
                  "vs_autoregressive": round(chosen.ratio, 3) if chosen else 1.0}
    lines = [f"# Tuned by `dgopt tune` on {rep.machine}, {d['tuned']['date']}, in {rep.seconds:.0f} s"
             + (f" from {src}" if src else "") + ".",
             "# step cost of the autoregressive step graph (ms) by positions per forward: "
             + ", ".join(f"{q}: {ms:.2f}" for q, ms in rep.cost_ms.items()),
             f"# autoregressive: {rep.autoregressive_tokens_per_s:.1f} tokens/s; configurations measured (tokens/s, "
             "x autoregressive in the adjacent block, tokens/step):"]
    for r in rep.rows:
        lines.append(f"#   {r.candidate.name}: " + (f"{r.tokens_per_s:.1f} tok/s, {r.ratio:.2f}x, "
                                                     f"{r.tokens_per_step:.2f} tok/step" + (f" ({r.note})" if r.note
                                                                                            else "")
                                                     if r.ratio is not None else r.note))
    if rep.batch_rows:
        lines.append("# the chosen configuration by batch (x autoregressive at the same batch): "
                     + ", ".join(f"{b}: {m.ratio:.2f}x" for b, m in rep.batch_rows)
                     + (f"; calls of more than {rep.draft_max_batch} rows run autoregressive decoding "
                        "(strategy.draft_max_batch)" if rep.draft_max_batch else ""))
    if rep.chosen.strategy["kind"] == "autoregressive":
        lines.append(f"# no configuration beat autoregressive by {100 * (MARGIN - 1):.0f} % on this machine: "
                     "autoregressive is the tuned choice")
    else:
        lines.append(f"# chosen: {rep.chosen.name} ({chosen.ratio:.2f}x autoregressive)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n" + yaml.safe_dump(d, sort_keys=False))
    tmp.replace(out)
    return d


def print_table(rep: TuneReport, console) -> None:
    from rich.table import Table
    if not console.is_terminal:
        console.width = max(console.width, 150)
    t = Table(title=f"dgopt tune on {rep.machine} (autoregressive {rep.autoregressive_tokens_per_s:.1f} tok/s)")
    for col in ("configuration", "positions/step", "tok/s", "vs AR", "tok/step", "ms/step", "note"):
        t.add_column(col, justify="left" if col in ("configuration", "note") else "right")
    for r in rep.rows:
        mark = " *" if r.candidate is rep.chosen else ""
        fmt = lambda v, f: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)  # noqa
        t.add_row(r.candidate.name + mark, str(r.candidate.positions), fmt(r.tokens_per_s, ".1f"),
                  fmt(r.ratio, ".2f") + ("x" if r.ratio is not None else ""), fmt(r.tokens_per_step, ".2f"),
                  fmt(r.ms_per_step, ".2f"), r.note)
    console.print(t)
    console.print("cost curve (ms per step by positions per forward): "
                  + ", ".join(f"{q}: {ms:.2f}" for q, ms in rep.cost_ms.items()))
    if rep.batch_rows:
        console.print("by batch (x autoregressive at the same batch): "
                      + ", ".join(f"{b}: {m.ratio:.2f}x" for b, m in rep.batch_rows))
    console.print(f"chosen: [bold]{rep.chosen.name}[/]" + ("" if rep.chosen.strategy["kind"] != "autoregressive" else
                  f" (no configuration beat autoregressive by {100 * (MARGIN - 1):.0f} % here)")
                  + (f", autoregressive above batch {rep.draft_max_batch} (strategy.draft_max_batch)"
                     if rep.draft_max_batch else ""))


def save_plot(rep: TuneReport, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    qs = list(rep.cost_ms)
    a.plot(qs, [rep.cost_ms[q] for q in qs], "o-")
    a.set_xscale("log", base=2)
    a.set_xlabel("positions per forward")
    a.set_ylabel("ms per step")
    a.set_title("step cost")
    rows = [r for r in rep.rows if r.ratio is not None]
    names = [r.candidate.name for r in rows]
    b.barh(names, [r.ratio for r in rows], color=["tab:green" if r.candidate is rep.chosen else "tab:blue"
                                                  for r in rows])
    b.axvline(1.0, color="k", ls="--", lw=1)
    b.set_xlabel("tokens/s vs autoregressive")
    b.set_title(f"chosen: {rep.chosen.name}")
    fig.suptitle(f"dgopt tune: {rep.machine}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
