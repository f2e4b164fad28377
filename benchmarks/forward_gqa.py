"""The contrib forward vs the direct one on grouped-query-attention models, side by side in one run.

    python benchmarks/forward_gqa.py                     # random 6.5M Llama (8 heads, 4 kv) and Qwen2 (8 heads, 2 kv)
    python benchmarks/forward_gqa.py --new 128 --repeats 5 --batch 1 4

Autoregressive greedy decode, the same prompts for both forwards, timed in interleaved rounds (median); checks that
both give transformers' tokens. Prints tokens/s per model, batch and forward, and contrib/direct; writes JSON to
benchmarks/results/forward_gqa.json."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RANDOM_65M, machine, prompts_for  # noqa: E402
from ar_decode import interleaved_medians  # noqa: E402

MODELS = {"llama-gqa2": RANDOM_65M,
          "qwen2-gqa4": {**RANDOM_65M, "family": "qwen2", "num_key_value_heads": 2}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import dgopt
    from dgopt.models.hf import load_model
    from dgopt.spec import spec_from_dict

    tmp = Path(tempfile.mkdtemp())
    rows = []
    for name, cfg in MODELS.items():
        spec = {"model": {"config": cfg}, "target": {"max_seq_len": 512, "max_batch": max(a.batch)}}
        lm = load_model(spec_from_dict(spec).model)
        prompts = prompts_for(lm, a.prompts)
        decs = {}
        for fwd in ("direct", "contrib"):
            spec["target"]["forward"] = fwd
            decs[fwd] = dgopt.load(dgopt.compile(spec, tmp / f"{name}-{fwd}"), threads=a.threads)
            decs[fwd].eos = set()
        ref = [lm.model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
               for p in prompts[:2]]
        same = all(d.generate(prompts[:2], max_new_tokens=32).ids == ref for d in decs.values())
        for B in a.batch:
            batches = [prompts[i:i + B] for i in range(0, len(prompts), B)]

            def run(fwd):
                return lambda: [decs[fwd].generate(b, max_new_tokens=a.new) for b in batches]
            med = interleaved_medians({f: run(f) for f in decs}, a.repeats)
            tps = {f: len(prompts) * a.new / s for f, s in med.items()}
            rows.append({"model": name, "heads": cfg["num_attention_heads"], "kv_heads": cfg["num_key_value_heads"],
                         "batch": B, "tokens_per_s": {f: round(v, 1) for f, v in tps.items()},
                         "contrib_over_direct": round(tps["contrib"] / tps["direct"], 3),
                         "greedy_identical_to_hf": same})
            r = rows[-1]
            print(f"{name:11s} ({r['heads']} heads, {r['kv_heads']} kv) batch {B}: direct {tps['direct']:8.1f} "
                  f"tok/s, contrib {tps['contrib']:8.1f} tok/s, contrib/direct x{r['contrib_over_direct']:.2f}; "
                  f"identical to transformers: {same}", flush=True)
    report = {"machine": machine(), "threads": a.threads, "new_tokens": a.new, "prompts": a.prompts,
              "repeats": a.repeats, "params": lm.info["num_parameters"], "rows": rows}
    print(f"machine: {report['machine']}; {a.threads} threads; {lm.info['num_parameters'] / 1e6:.2f} M params; "
          f"{a.prompts} prompts x {a.new} new tokens; median of {a.repeats} interleaved rounds")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forward_gqa.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
