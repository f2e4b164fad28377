"""Where a step's time goes: replay the step feeds of real generations through variants of an artifact's step graph.

Each artifact generates from the fixed prompts once while every step's feeds (KV cache included) are recorded; the
recorded steps then run through each graph, the graphs interleaved round by round, and the median time per step is
printed for each, with its onnxruntime kernel count. A variant is the artifact's own step.onnx cut down to some of
its outputs (`--without proposals`: the step without the recycle module's chain) or any .onnx file with the same
inputs (`--graph`). Prefill steps are left out (their width differs).

    python benchmarks/step_replay.py out/recycle --without proposals
    python benchmarks/step_replay.py out/recycle out/autoregressive --rounds 30

Times are this machine's (medians over rounds; it drifts by 10-40% over minutes): compare rows of one run only."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY_PROMPTS, machine  # noqa: E402


def record(art: Path, prompts: int, new: int, threads: int) -> tuple[list[dict], str]:
    """Every decode step's feeds (the x-block of one token: no prefill) of `prompts` generations."""
    import dgopt
    from dgopt.runtime import session as S
    dec = dgopt.load(art, threads=threads)
    steps, orig = [], S.OrtSession.run

    def run(self, feeds, cache):
        steps.append({**feeds, **dict(zip(self.past["tensors"], cache))})
        return orig(self, feeds, cache)
    S.OrtSession.run = run
    try:
        for p in PY_PROMPTS[:prompts]:
            n = len(steps)
            dec.generate(p if dec.manifest.get("tokenizer") else [5, 17, 42], max_new_tokens=new)
            del steps[n]        # the prefill
    finally:
        S.OrtSession.run = orig
    return steps, str(art / dec.manifest["step"])


def without(step: str, drop: list[str], out: Path) -> str:
    """The step graph with only the outputs not in `drop` (and what they need)."""
    import onnx
    import onnx.utils
    m = onnx.load(step, load_external_data=False)
    keep = [o.name for o in m.graph.output if o.name not in drop]
    dst = out / f"{Path(step).parent.name}-without-{'-'.join(drop)}.onnx"
    onnx.utils.extract_model(step, str(dst), [i.name for i in m.graph.input], keep)
    return str(dst)


def kernels(path: str, threads: int) -> tuple[object, int]:
    import onnx
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = f"{d}/opt.onnx"
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        n = len(onnx.load(f"{d}/opt.onnx", load_external_data=False).graph.node)
    return sess, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--without", nargs="*", default=[], help="also time each artifact's step without these outputs")
    ap.add_argument("--graph", nargs="*", default=[], help="also time these .onnx files on the first artifact's steps")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dgopt-replay-"))
    rows = []       # (label, session, kernels, feeds)
    for i, art in enumerate(a.artifacts):
        steps, step = record(art, a.prompts, a.new, a.threads)
        import onnx
        outs = {o.name for o in onnx.load(step, load_external_data=False).graph.output}
        paths = [step] + ([without(step, a.without, tmp)] if set(a.without) & outs else []) + \
            (a.graph if i == 0 else [])
        for p in paths:
            sess, n = kernels(p, a.threads)
            names = {x.name for x in sess.get_inputs()}
            rows.append((f"{art.name}: {Path(p).name}", sess, n, [{k: v for k, v in f.items() if k in names}
                                                                   for f in steps]))
    times = {r[0]: [] for r in rows}
    for _ in range(a.rounds):
        for label, sess, _, feeds in rows:
            t = time.perf_counter()
            for f in feeds:
                sess.run(None, f)
            times[label].append((time.perf_counter() - t) / len(feeds) * 1e6)
    print(f"{machine()}; {a.prompts} prompts x {a.new} new tokens, {a.rounds} rounds, {a.threads} threads")
    print(f"{'graph':60s} {'steps':>5s} {'kernels':>7s} {'median us/step':>14s} {'min':>8s}")
    for label, _, n, feeds in rows:
        print(f"{label[:60]:60s} {len(feeds):5d} {n:7d} {statistics.median(times[label]):14.1f} "
              f"{min(times[label]):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
