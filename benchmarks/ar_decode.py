"""Autoregressive greedy decode: dgopt ONNX artifact (-O0 and -O2) vs transformers generate, same model, same run.

    python benchmarks/ar_decode.py                       # the trained code-tiny if built, else a random 6.5M Llama
    python benchmarks/ar_decode.py --model code-tiny --new 128 --repeats 5

Prints the machine, model size, compile time, tokens/s medians and ratios; writes JSON (+ PNG with matplotlib) to
benchmarks/results/."""
from __future__ import annotations

import argparse
import json
import platform
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


def median_time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="auto", help="a built model name (code-tiny), a HF dir, or 'random'")
    ap.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample", action="store_true",
                    help="sampled decoding (temperature 0.8, top-k 50): shows the Gumbel fusion's whole-step effect")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import dgopt
    from dgopt.models.hf import load_model
    from dgopt.spec import spec_from_dict

    spec = model_spec(a.model)
    gen_kw = dict(do_sample=False)
    if a.sample:
        spec["sampling"] = {"kind": "sample", "temperature": 0.8, "top_k": 50}
        gen_kw = dict(do_sample=True, temperature=0.8, top_k=50, top_p=1.0)
    lm = load_model(spec_from_dict(spec).model, lambda p: Path(p))
    prompts = prompts_for(lm, a.prompts)
    tmp = Path(tempfile.mkdtemp())
    compile_s = {}
    decs = {}
    for lvl in (0, 2):
        t = time.perf_counter()
        art = dgopt.compile(spec, tmp / f"O{lvl}", opt_level=lvl)
        compile_s[lvl] = time.perf_counter() - t
        decs[lvl] = dgopt.load(art, threads=a.threads)

    model = lm.model
    eos = None  # fixed-length runs: every system generates exactly a.new tokens
    model.generation_config.eos_token_id = eos
    for d in decs.values():
        d.eos = set()

    def hf():
        for p in prompts:
            ids = torch.tensor([p])
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new, **gen_kw,
                               min_new_tokens=a.new, pad_token_id=0)

    def dg(lvl):
        return lambda: [decs[lvl].generate(p, max_new_tokens=a.new) for p in prompts]

    # exactness on the benchmark itself
    same = a.sample or all(decs[2].generate(p, max_new_tokens=32).ids[0] ==
               model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
               for p in prompts[:3])
    total = a.new * len(prompts)
    res = {"hf_generate": median_time(hf, a.repeats), "dgopt_O0": median_time(dg(0), a.repeats),
           "dgopt_O2": median_time(dg(2), a.repeats)}
    tps = {k: total / v for k, v in res.items()}
    report = {"machine": machine(), "backend": "onnxruntime CPU", "model": lm.source,
              "params": lm.info["num_parameters"], "prompts": len(prompts), "new_tokens": a.new,
              "compile_s": {f"O{k}": round(v, 2) for k, v in compile_s.items()},
              "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
              "ratio_vs_hf": {k: round(v / tps["hf_generate"], 2) for k, v in tps.items()},
              "greedy_identical_to_hf": same}
    print(f"machine: {report['machine']}")
    print(f"model: {lm.source} ({lm.info['num_parameters'] / 1e6:.2f} M params), {len(prompts)} prompts x "
          f"{a.new} new tokens, batch 1, {a.threads} threads, median of {a.repeats}")
    print(f"compile: -O0 {compile_s[0]:.2f}s, -O2 {compile_s[2]:.2f}s")
    for k in res:
        print(f"  {k:12s} {tps[k]:9.1f} tokens/s   x{tps[k] / tps['hf_generate']:.2f} vs transformers generate")
    if not a.sample:
        print(f"greedy tokens identical to transformers: {same}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report["mode"] = "sample" if a.sample else "greedy"
    (out / f"ar_decode_{report['mode']}.json").write_text(json.dumps(report, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(tps), list(tps.values()), color=["gray", "tab:blue", "tab:green"])
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{report['mode']} decode, {lm.info['num_parameters'] / 1e6:.1f}M params, {platform.machine()}")
        fig.tight_layout()
        fig.savefig(out / f"ar_decode_{report['mode']}.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
