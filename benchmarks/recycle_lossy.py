"""RecycleGPT's two modes side by side: strategy recycle with verify: true (lossless, the target's greedy output)
against verify: false (the paper's mode: the module's tokens committed unverified), and autoregressive, in one run:
speed (tok/s, ratio to the adjacent autoregressive block, tokens per target forward) and the lossy mode's quality
cost:
  agreement   the share of positions where its output equals the target's greedy output (over the first --new
              tokens of each prompt), and the mean length of the common prefix before the first difference;
  perplexity  on held-out stdlib windows (teacher-forced): the target's, and the lossy model's, in which each group
              of k+1 tokens is predicted by the target (the first) and the module's chain from the target's hidden
              state (the next k), as the unverified mode decodes.

    python benchmarks/recycle_lossy.py [--module code-tiny-recycle] [--k 1 2 4] [--prompts 20] [--new 96]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY_PROMPTS, machine, model_spec  # noqa: E402


def perplexity(target, module, windows, k: int | None) -> float:
    """exp(mean NLL) of windows [N, T] (teacher-forced). k None: the target's own; else the lossy model's."""
    import torch

    from dgopt.models import recycle as R
    from dgopt.training.recycle import _teacher
    frozen = R.Frozen(target)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), 8):
            x = windows[i:i + 8]
            hn, logp = _teacher(target, x)                    # logp[:, t]: the target's prediction of x[:, t+1]
            T = x.shape[1]
            for t in range(T - 1):
                if k is None or t % (k + 1) == 0:
                    lp = logp[:, t]
                else:                                          # chain step j from the last target position
                    j = t % (k + 1)
                    h = hn[:, t - j]
                    for s in range(j):
                        h, logits = frozen.step(module, h, x[:, t - j + 1 + s])
                    lp = torch.log_softmax(logits, -1)
                nll -= float(lp.gather(1, x[:, t + 1:t + 2]).sum())
                n += x.shape[0]
    return math.exp(nll / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="code-tiny")
    ap.add_argument("--module", default="code-tiny-recycle", help="a built module name or directory")
    ap.add_argument("--k", nargs="+", type=int, default=[1, 2, 4], help="chain lengths of the lossy rows")
    ap.add_argument("--lossless-k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-windows", type=int, default=64, help="held-out stdlib windows of 128 tokens")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    import torch

    import dgopt
    from dgopt.models import recycle as R
    from dgopt.spec import spec_from_dict
    from dgopt.training.recycle import PROMPT, NEW, _corpus_streams, _load_target, _windows
    base = {**model_spec(a.model), "target": {"max_batch": 1, "max_seq_len": 1024}}
    rspec = {"path": str(Path(a.module).resolve())} if Path(a.module).is_dir() else {"name": a.module}
    mdir, _ = R.module_dir(spec_from_dict({**base, "strategy": {"kind": "recycle", "k": 1}, "recycle": rspec})
                           .recycle, lambda p: Path(p))
    tmp = Path(tempfile.mkdtemp(prefix="dgopt-lossy-"))
    rows = [("autoregressive", {"kind": "autoregressive"}, {}),
            (f"recycle k{a.lossless_k} verify:true", {"kind": "recycle", "k": a.lossless_k}, {"recycle": rspec})]
    rows += [(f"recycle k{k} verify:false (LOSSY)", {"kind": "recycle", "k": k, "verify": False}, {"recycle": rspec})
             for k in a.k]
    decs = []
    for i, (name, st, extra) in enumerate(rows):
        art = dgopt.compile({**base, **extra, "strategy": st}, tmp / f"{i}")
        decs.append((name, dgopt.load(art, threads=a.threads)))
    ar = decs[0][1]
    prompts = [ar.encode(p) for p in PY_PROMPTS[:a.prompts]]
    ref = [ar.generate(p, max_new_tokens=a.new).ids[0] for p in prompts]

    def block(dec):
        t, toks, steps = time.perf_counter(), 0, 0
        outs = []
        for p in prompts:
            r = dec.generate(p, max_new_tokens=a.new)
            toks, steps = toks + r.stats["new_tokens"], steps + r.stats["steps"]
            outs.append(r.ids[0])
        return toks / (time.perf_counter() - t), toks / steps, outs

    for _, d in decs:
        d.generate(prompts[0], max_new_tokens=8)
    results = {name: {"ratios": [], "tps": []} for name, _ in decs[1:]}
    for _ in range(a.repeats):
        for name, d in decs[1:]:
            ar_tps, _, _ = block(ar)
            tps, tpf, outs = block(d)
            r = results[name]
            r["ratios"].append(tps / ar_tps)
            r["tps"].append(tps)
            r["tpf"], r["outs"] = tpf, outs

    target, tdir = _load_target(a.model, "cpu")
    module, _ = R.load(mdir)
    _, val_s = _corpus_streams(["stdlib"], tdir)
    windows = _windows(val_s, a.ppl_windows, PROMPT + NEW, torch.Generator().manual_seed(0))
    ppl_target = perplexity(target, module, windows, None)

    print(f"machine: {machine()}; {a.model} + {mdir.name}; {len(prompts)} prompts x {a.new} new tokens, batch 1")
    print(f"perplexity on {len(windows)} held-out stdlib windows of {PROMPT + NEW} tokens: target {ppl_target:.2f}")
    print("| row | tok/s | vs AR | tokens per target forward | agreement with greedy | common prefix | "
          "perplexity |")
    print("|---|---|---|---|---|---|---|")
    for name, st, _ in rows[1:]:
        r = results[name]
        same = sum(x == y for o, g in zip(r["outs"], ref) for x, y in zip(o, g))
        total = sum(len(g) for g in ref)
        prefix = statistics.mean(next((i for i, (x, y) in enumerate(zip(o, g)) if x != y), min(len(o), len(g)))
                                 for o, g in zip(r["outs"], ref))
        ppl = ppl_target if st.get("verify", True) else perplexity(target, module, windows, st["k"])
        print(f"| {name} | {statistics.median(r['tps']):.0f} | {statistics.median(r['ratios']):.2f}x | "
              f"{r['tpf']:.2f} | {same / total:.3f} | {prefix:.1f} | {ppl:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
