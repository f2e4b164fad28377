"""Jacobi and lookahead on a consistency-trained model vs its base, side by side in one run.

    python benchmarks/cllm.py                                   # code-tiny-cllm vs code-tiny
    python benchmarks/cllm.py --cllm code-tiny-cllm --base code-tiny --jacobi 8 16 --prompts 10 --new 96

Rows: autoregressive on the base (the reference every "vs base AR" ratio is taken against), autoregressive, Jacobi
(--jacobi block sizes x --guess ngram|chain), prompt lookup (--ngram k: the n-gram guesses alone, no Jacobi) and
lookahead (--lookahead W,N,G) on both models. Each row runs all prompts as one block
right after a block of the base's autoregressive row, --repeats rounds; its ratio is the median over rounds of its
tok/s over that adjacent block's (this machine's speed drifts over minutes). Every greedy row is checked
token-identical to transformers greedy `generate` on its own model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model_spec, prompts_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cllm", default="code-tiny-cllm")
    ap.add_argument("--base", default="code-tiny")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--jacobi", nargs="*", type=int, default=[4, 8], help="jacobi block sizes")
    ap.add_argument("--guess", nargs="*", default=["ngram", "chain"], choices=["ngram", "chain"],
                    help="jacobi guesses (strategy.guess) to run at each block size")
    ap.add_argument("--ngram", nargs="*", type=int, default=[4],
                    help="k of strategy ngram (prompt lookup, no Jacobi) rows: the guesses' source alone")
    ap.add_argument("--lookahead", nargs="*", default=["5,4,5"], help="lookahead W,N,G")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import dgopt
    from dgopt.models.hf import load_model
    from dgopt.spec import spec_from_dict

    specs = {m: model_spec(m) for m in (a.base, a.cllm)}
    lms = {m: load_model(spec_from_dict(s).model, lambda p: Path(p)) for m, s in specs.items()}
    prompts = prompts_for(lms[a.base], a.prompts)
    refs = {}
    for m, lm in lms.items():
        outs = []
        for p in prompts:
            ids = torch.tensor([p])
            with torch.no_grad():
                o = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new,
                                      do_sample=False, pad_token_id=0)
            outs.append(o[0, len(p):].tolist())
        refs[m] = outs

    tmp = Path(tempfile.mkdtemp())
    rows = [(a.base, "autoregressive", {"kind": "autoregressive"})]
    for m in (a.base, a.cllm):
        if m != a.base:
            rows.append((m, "autoregressive", {"kind": "autoregressive"}))
        for n in a.jacobi:
            for gs in a.guess:
                rows.append((m, f"jacobi n{n} {gs}", {"kind": "jacobi", "block": n, "guess": gs}))
        for k in a.ngram:
            rows.append((m, f"ngram k{k}", {"kind": "ngram", "k": k}))
        for c in a.lookahead:
            W, N, G = map(int, c.split(","))
            rows.append((m, f"lookahead W{W} N{N} G{G}", {"kind": "lookahead", "window": W, "ngram": N, "guesses": G}))
    decs = []
    for i, (m, name, st) in enumerate(rows):
        art = dgopt.compile({**specs[m], "strategy": st}, tmp / f"{i}", opt_level=2)
        dec = dgopt.load(art, threads=a.threads)
        dec.generate(prompts[0], max_new_tokens=8)     # warm-up
        decs.append((m, name, dec))

    def block(dec):
        outs, steps, t = [], 0, time.perf_counter()
        for p in prompts:
            g = dec.generate(p, max_new_tokens=a.new)
            outs.append(g.ids[0])
            steps += g.stats["steps"]
        return outs, steps, time.perf_counter() - t

    def tps(r):
        return sum(len(o) for o in r[0]) / r[2]
    res = {i: [] for i in range(len(decs))}
    for _ in range(a.repeats):
        for i, (_, _, dec) in enumerate(decs):
            base = block(decs[0][2])
            res[i].append((block(dec), base))

    print(f"machine: {machine()}; onnxruntime CPU, {a.threads} threads")
    print(f"{len(prompts)} prompts x {a.new} new tokens, batch 1, greedy, -O2; base: {a.base}")
    print(f"{'':40s} {'tok/s':>8s} {'vs base AR':>10s} {'tok/step':>9s}  identical to own HF greedy")
    table = []
    for i, (m, name, _) in enumerate(decs):
        runs = res[i]
        last = runs[-1][0]
        ratio = statistics.median(tps(r) / tps(b) for r, b in runs)
        toks = sum(len(o) for o in last[0])
        row = {"model": m, "strategy": name, "tokens_per_s": statistics.median(tps(r) for r, _ in runs),
               "vs_base_ar": ratio, "tokens_per_step": toks / last[1], "identical": last[0] == refs[m]}
        table.append(row)
        print(f"{m + ' ' + name:40s} {row['tokens_per_s']:8.1f} {ratio:9.2f}x {row['tokens_per_step']:9.2f}  "
              f"{row['identical']}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cllm.json").write_text(json.dumps({"machine": machine(), "threads": a.threads, "prompts": len(prompts),
                                               "new": a.new, "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
