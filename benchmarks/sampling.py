"""Sampling kernels side by side: torch softmax+multinomial, torch Gumbel-max (fresh noise), dgopt's sampler lowered
to ONNX (fused Gumbel at -O2 and the unfused inverse-CDF at -O0, onnxruntime), and a plain argmax as the floor.

    python benchmarks/sampling.py                 # all shapes of the sampling issue
    python benchmarks/sampling.py --shapes 1x32000,512x100000 --repeats 20
    python benchmarks/sampling.py --device cuda   # torch CUDA and ORT's CUDA EP, logits and noise on the device

Noise is fresh for every trial: 'precomputed' rows draw it before the timed region (as the runtime does, ahead of
the step), 'incl. noise' rows draw it inside. Medians; ratios are against torch softmax+multinomial."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

SHAPES = "1x32000,32x32000,32x128256,128x50000,512x100000"


SYNC = lambda: None  # noqa: E731   (torch.cuda.synchronize on the GPU: time kernels, not launches)


def timed(fn, repeats, setup=lambda i: None):
    fn(setup(-1))
    ts = []
    for i in range(repeats):
        arg = setup(i)
        SYNC()
        t = time.perf_counter()
        fn(arg)
        SYNC()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def ort_runner(sess, device: str, out: str = "next_token"):
    """fn(feeds) -> None. On CUDA the feeds are OrtValues already on the device and the output stays there (IO
    binding), so no host<->device copy of the logits is timed. NOT RUN YET: no GPU was lent to this project so far."""
    if device == "cpu":
        return lambda feeds: sess.run(None, feeds)

    def run(feeds):
        io = sess.io_binding()
        for k, v in feeds.items():
            io.bind_ortvalue_input(k, v)
        io.bind_output(out, "cuda")
        sess.run_with_iobinding(io)
    return run


def ort_sampler(V: int, fused: bool, threads: int, device: str = "cpu"):
    from dgopt.backends.onnx import lower_to_onnx
    from dgopt.ir import Graph
    from dgopt.pipeline import optimize
    from dgopt.spec import SamplingSpec, spec_from_dict
    from dgopt.strategies.autoregressive import add_sampler
    g = Graph()
    x = g.add("input", attrs={"name": "logits", "type": "logits"}, id="logits")
    g.set_output("next_token", add_sampler(g, x, SamplingSpec(kind="sample")))
    spec = spec_from_dict({"model": {"config": {"family": "llama"}}})
    g, _ = optimize(g, spec, 2 if fused else 0)
    model, _ = lower_to_onnx(g, {}, vocab_size=V)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    if sess.get_providers()[0] != providers[0]:        # onnxruntime drops a provider it cannot start, with a log line
        sys.exit(f"error: onnxruntime started the sampler on {sess.get_providers()}, not {providers[0]}")
    return sess


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = a.device
    if dev == "cuda":
        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
            sys.exit("error: --device cuda needs a CUDA build of torch and onnxruntime-gpu (pip install -e '.[gpu]')")
        global SYNC
        SYNC = torch.cuda.synchronize
        where = f"{torch.cuda.get_device_name()}, torch CUDA, onnxruntime CUDA EP (IO binding)"
    else:
        where = f"torch CPU, onnxruntime CPU, {a.threads} threads"
    rows = []
    print(f"machine: {machine()}; {where}; torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"median of {a.repeats}, times in ms")
    hdr = ["shape", "softmax+multinomial", "gumbel incl. noise", "gumbel precomputed", "dgopt -O0 (ORT)",
           "dgopt -O2 gumbel (ORT)", "argmax floor", "-O2 speedup", "-O2 / floor"]
    print(" | ".join(hdr))
    for shape in a.shapes.split(","):
        B, V = map(int, shape.split("x"))
        gen = torch.Generator(dev).manual_seed(0)
        logits = torch.randn(B, V, generator=gen, device=dev) * 3
        pool = [-torch.log(-torch.log(torch.rand(B, V, generator=gen, device=dev)))
                for _ in range(min(a.repeats + 1, 6))]
        upool = [np.random.default_rng(i).random(B, dtype=np.float32) for i in range(a.repeats + 1)]
        if dev == "cuda":
            ov = lambda x: ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)  # noqa: E731
            ln, gpool, upool = ov(logits.cpu().numpy()), [ov(g.cpu().numpy()) for g in pool], [ov(u) for u in upool]
        else:
            ln, gpool = logits.numpy(), [g.numpy() for g in pool]
        noise_at = lambda i: pool[i % len(pool)]    # distinct draws in turn (memory caps the pool at 6 tensors)
        r = {}
        r["softmax+multinomial"] = timed(lambda _: torch.multinomial(torch.softmax(logits, -1), 1), a.repeats)
        r["gumbel incl. noise"] = timed(
            lambda _: (logits - torch.empty_like(logits).exponential_(generator=gen).log_()).argmax(-1), a.repeats)
        r["gumbel precomputed"] = timed(lambda g: (logits + g).argmax(-1), a.repeats, noise_at)
        s0 = ort_runner(ort_sampler(V, False, a.threads, dev), dev)
        s2 = ort_runner(ort_sampler(V, True, a.threads, dev), dev)
        r["dgopt -O0 (ORT)"] = timed(lambda u: s0({"logits": ln, "uniform": u}), a.repeats, lambda i: upool[i + 1])
        r["dgopt -O2 gumbel (ORT)"] = timed(lambda g: s2({"logits": ln, "gumbel": g}), a.repeats,
                                            lambda i: gpool[i % len(gpool)])
        r["argmax floor"] = timed(lambda _: logits.argmax(-1), a.repeats)
        sp = r["softmax+multinomial"] / r["dgopt -O2 gumbel (ORT)"]
        fl = r["dgopt -O2 gumbel (ORT)"] / r["argmax floor"]
        rows.append({"shape": shape, **{k: round(v, 4) for k, v in r.items()}, "O2_speedup_vs_torch": round(sp, 2),
                     "O2_over_floor": round(fl, 2)})
        print(" | ".join([shape] + [f"{v:.3f}" for v in r.values()] + [f"x{sp:.2f}", f"x{fl:.2f}"]))
        del pool, gpool
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sampling_{dev}.json").write_text(json.dumps({"machine": machine(), "device": where, "rows": rows},
                                                         indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = [k for k in rows[0] if k not in ("shape", "O2_speedup_vs_torch", "O2_over_floor")]
        fig, ax = plt.subplots(figsize=(9, 4))
        w = 0.8 / len(keys)
        for j, k in enumerate(keys):
            ax.bar([i + j * w for i in range(len(rows))], [r[k] for r in rows], w, label=k)
        ax.set_xticks([i + 0.4 for i in range(len(rows))], [r["shape"] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"sampling_{dev}.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
