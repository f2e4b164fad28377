"""ngram (prompt lookup) against autoregressive, side by side in one run, and a tuned spec against autoregressive.

    python benchmarks/ngram.py                                    # 10 code prompts x 128 tokens, 2 rounds
    python benchmarks/ngram.py --tuned tuned.yaml --rounds 3      # also: a `dgopt tune` output vs autoregressive

Each row runs all prompts as one block right after an autoregressive block of the same prompts; its ratio is the
median over rounds of its tokens/s over that adjacent block's (the machine's speed drifts over minutes). Outputs are
compared with autoregressive's (which tests/ prove token-identical to transformers generate). A lighter
benchmarks/strategies.py: no transformers rows (they took over 20 minutes on this shared machine)."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import code_prompts, machine, model_spec, prompts_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="code-tiny")
    ap.add_argument("--prompts", type=int, default=10, help="code prompts (256 tokens from files of rich)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rows", nargs="*", default=["4,1", "8,1", "3,2", "h2,8"],
                    help="ngram k,guesses; hK,KMAX: k_schedule heuristic from K up to KMAX")
    ap.add_argument("--tuned", nargs="*", default=[], help="tuned specs (dgopt tune -o) to time against "
                    "autoregressive on the benchmarks' short prompts (benchmarks/_common.py PY_PROMPTS)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import dgopt
    from dgopt.models.hf import load_model
    from dgopt.spec import load_spec, spec_from_dict
    base = model_spec(a.model)
    lm = load_model(spec_from_dict(base).model, lambda p: Path(p))
    code = code_prompts(lm, a.prompts)
    short = prompts_for(lm, 20)
    tmp = Path(tempfile.mkdtemp())

    def load(spec, name):
        dec = dgopt.load(dgopt.compile(spec, tmp / name), threads=a.threads)
        dec.generate(code[0], max_new_tokens=8)          # warm-up
        return dec

    ar = load({**base, "strategy": {"kind": "autoregressive"}}, "ar")
    rows = []
    for r in a.rows:
        if r.startswith("h"):
            k, km = map(int, r[1:].split(","))
            st, name = {"kind": "ngram", "k": k, "k_schedule": "heuristic", "k_max": km}, f"ngram heuristic k{k}..{km}"
        else:
            k, G = map(int, r.split(","))
            st, name = {"kind": "ngram", "k": k, "guesses": G}, f"ngram k{k} G{G}"
        rows.append((name, load({**base, "strategy": st}, name.replace(" ", "_")), code))
    for path in a.tuned:
        sp = load_spec(path)
        rows.append((f"tuned {Path(path).name} ({sp.strategy.kind})", load(sp, Path(path).stem), short))

    def block(dec, prompts):
        outs, steps, t = [], 0, time.perf_counter()
        for p in prompts:
            g = dec.generate(p, max_new_tokens=a.new)
            outs.append(g.ids[0])
            steps += g.stats["steps"]
        return outs, time.perf_counter() - t, steps

    res = {name: [] for name, _, _ in rows}
    for _ in range(a.rounds):
        for name, dec, prompts in rows:
            ao, at, asteps = block(ar, prompts)
            o, t, steps = block(dec, prompts)
            n = sum(map(len, o))
            res[name].append({"ratio": at / t, "tps": n / t, "ar_tps": sum(map(len, ao)) / at, "tps_step": n / steps,
                              "ms_step": 1e3 * t / steps, "ar_ms_step": 1e3 * at / asteps, "same": o == ao})
    print(f"machine: {machine()} (shared with other jobs: load average {Path('/proc/loadavg').read_text().split()[0]}"
          f"); onnxruntime CPU, {a.threads} threads; model {lm.source} ({lm.info['num_parameters'] / 1e6:.2f} M)")
    print(f"ngram rows: {len(code)} code prompts (256 tokens of rich sources) x {a.new} new tokens; tuned rows: "
          f"{len(short)} short prompts x {a.new}; {a.rounds} rounds, median")
    print(f"{'':40s} {'tok/s':>7s} {'AR tok/s':>8s} {'vs AR':>6s} {'tok/step':>8s} {'ms/step':>8s} {'AR ms/step':>10s}"
          "  identical")
    for name, _, _ in rows:
        rs = res[name]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"{name:40s} {med('tps'):7.1f} {med('ar_tps'):8.1f} {med('ratio'):5.2f}x {med('tps_step'):8.2f} "
              f"{med('ms_step'):8.2f} {med('ar_ms_step'):10.2f}  {all(r['same'] for r in rs)}")


if __name__ == "__main__":
    main()
