"""Autoregressive greedy decode: dgopt ONNX artifact (-O0 and -O2) vs transformers generate, same model, same run.

    python benchmarks/ar_decode.py                       # the trained code-tiny if built, else a random 6.5M Llama
    python benchmarks/ar_decode.py --model code-tiny --new 128 --repeats 5
    python benchmarks/ar_decode.py --device cuda [--precision fp16]   # ORT CUDA EP vs transformers on the GPU

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


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds per function, timed in rounds (each once per round): the machine's speed drifts over minutes,
    and timing one system's repeats back to back would compare the drift, not the systems."""
    for fn in fns.values():
        fn()  # warm-up
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="auto", help="a built model name (code-tiny), a HF dir, or 'random'")
    ap.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample", action="store_true",
                    help="sampled decoding (temperature 0.8, top-k 50): shows the Gumbel fusion's whole-step effect")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the artifact on ORT's CUDA EP (IO binding, KV on the GPU) vs transformers on the GPU")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                    help="fp16 (cuda only): fp16 artifact vs transformers in fp16")
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                    help="GPU memory bandwidth for the latency floor (default: H100 SXM, 3350 GB/s)")
    ap.add_argument("--launch-us", type=float, default=2.5, help="assumed cost of one kernel launch for the floor")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    if a.precision == "fp16" and a.device != "cuda":
        ap.error("--precision fp16 needs --device cuda")
    torch.set_num_threads(a.threads)

    import dgopt
    from dgopt.models.hf import load_model
    from dgopt.spec import spec_from_dict

    spec = model_spec(a.model)
    gen_kw = dict(do_sample=False)
    if a.sample:
        spec["sampling"] = {"kind": "sample", "temperature": 0.8, "top_k": 50}
        gen_kw = dict(do_sample=True, temperature=0.8, top_k=50, top_p=1.0)
    spec["target"] = {"device": a.device, "precision": a.precision}
    lm = load_model(spec_from_dict(spec).model, lambda p: Path(p))
    dev = torch.device(a.device)
    if a.precision == "fp16":
        lm.model.half()
    lm.model.to(dev)
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
            ids = torch.tensor([p], device=dev)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new, **gen_kw,
                               min_new_tokens=a.new, pad_token_id=0)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def dg(lvl):
        return lambda: [decs[lvl].generate(p, max_new_tokens=a.new) for p in prompts]

    # exactness on the benchmark itself
    same = a.sample or all(decs[2].generate(p, max_new_tokens=32).ids[0] ==
               model.generate(torch.tensor([p], device=dev), attention_mask=torch.ones(1, len(p), dtype=torch.long,
                                                                                      device=dev),
                              max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
               for p in prompts[:3])
    total = a.new * len(prompts)
    res = interleaved_medians({"hf_generate": hf, "dgopt_O0": dg(0), "dgopt_O2": dg(2)}, a.repeats)
    tps = {k: total / v for k, v in res.items()}
    backend = f"onnxruntime {decs[2].session.providers[0]}, {a.precision}"
    report = {"machine": machine(), "backend": backend, "model": lm.source,
              "params": lm.info["num_parameters"], "prompts": len(prompts), "new_tokens": a.new,
              "compile_s": {f"O{k}": round(v, 2) for k, v in compile_s.items()},
              "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
              "ratio_vs_hf": {k: round(v / tps["hf_generate"], 2) for k, v in tps.items()},
              "greedy_identical_to_hf": same}
    if a.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
        report["floor"] = _floor(decs[2], lm, a)
    print(f"machine: {report['machine']}; {backend}" + (f"; {report['gpu']}" if a.device == "cuda" else ""))
    print(f"model: {lm.source} ({lm.info['num_parameters'] / 1e6:.2f} M params), {len(prompts)} prompts x "
          f"{a.new} new tokens, batch 1, {a.threads} threads, median of {a.repeats} interleaved rounds")
    print(f"compile: -O0 {compile_s[0]:.2f}s, -O2 {compile_s[2]:.2f}s")
    for k in res:
        print(f"  {k:12s} {tps[k]:9.1f} tokens/s   x{tps[k] / tps['hf_generate']:.2f} vs transformers generate")
    if not a.sample:
        print(f"greedy tokens identical to transformers: {same}")
    if a.device == "cuda":
        f = report["floor"]
        ms = 1e3 / tps["dgopt_O2"]
        print(f"per token: dgopt -O2 {ms:.3f} ms; floor {f['floor_ms']:.3f} ms = weights {f['weight_mb']:.1f} MB / "
              f"{a.bandwidth_gbs:.0f} GB/s ({f['bytes_ms']:.4f} ms) + {f['kernels']} kernels x {a.launch_us} us "
              f"({f['launch_ms']:.3f} ms); dgopt is {ms / f['floor_ms']:.2f}x the floor")
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


def _floor(dec, lm, a) -> dict:
    """Per-token latency floor on the GPU: the weights read once at full bandwidth plus one launch per kernel of the
    step as ORT runs it (node count of its optimised graph)."""
    import onnx
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as d:
        opts.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(str(dec.path / dec.manifest["step"]), opts, providers=dec.session.providers)
        kernels = len(onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node)
    weight_mb = lm.info["num_parameters"] * (2 if a.precision == "fp16" else 4) / 1e6
    bytes_ms = weight_mb / 1e3 / a.bandwidth_gbs * 1e3
    launch_ms = kernels * a.launch_us / 1e3
    return {"kernels": kernels, "weight_mb": weight_mb, "bytes_ms": bytes_ms, "launch_ms": launch_ms,
            "floor_ms": bytes_ms + launch_ms}


if __name__ == "__main__":
    main()
