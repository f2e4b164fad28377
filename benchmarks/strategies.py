"""Decoding strategies side by side on one model and one prompt set, in one run: autoregressive, lookahead at several
(W, N, G), jacobi, each at -O0 (separate forwards) and -O2 (merged), speculative with a draft of the same tokenizer
(several k; draft and target fused in one step graph, and for --unfused-k in two), UAG with a draft of another
tokenizer and recycle (RecycleGPT/EAGLE: a recyclable module drafting from the target's hidden states; --recycle),
plus transformers generate greedy, with prompt lookup decoding, assisted generation and UAG as external baselines.
Greedy rows are checked token-identical; sampling rows (--sample-k: speculative fused and unfused, uag, recycle;
lookahead at the first config) are timed against autoregressive sampling only.

    python benchmarks/strategies.py                      # code-tiny if built, else a random 6.5M Llama
    python benchmarks/strategies.py --prompts 20 --new 128 --configs 5,4,5 7,4,7 10,5,10
    python benchmarks/strategies.py --device cuda --model code-small     # on the lent GPU (onnxruntime-gpu)
    python benchmarks/strategies.py --code-prompts 10 --new 128 --ngram 4,1 8,1 --configs --jacobi --draft none \
        --xdraft none --sample-k      # ngram (prompt lookup) against autoregressive on longer code prompts

The dgopt rows are timed in blocks: a row runs all prompts right after autoregressive runs them (greedy rows after
greedy, sampled after sampled), --repeats rounds; a row's "vs AR" is the median over rounds of its ratio to that
adjacent autoregressive block, tok/s its median block. This machine's speed drifts by 10-40% over minutes: rows
timed minutes apart would compare the drift; rows alternated prompt by prompt slow each other down.
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
from _common import code_prompts, machine, model_spec, prompts_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="auto")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1, help="dgopt rows generate the prompts in batches of this many "
                    "(left-padded; at most the specs' max_batch 8); transformers rows stay at batch 1 (its assisted "
                    "generation and UAG take one prompt); tok/step is then per row")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--configs", nargs="*", default=["5,4,5", "7,4,7", "5,3,5"], help="lookahead W,N,G")
    ap.add_argument("--jacobi", nargs="*", type=int, default=[8], help="jacobi block sizes")
    ap.add_argument("--ngram", nargs="*", default=["4,1", "8,1"], help="ngram (prompt lookup) k,guesses")
    ap.add_argument("--code-prompts", type=int, default=0, help="use this many longer code prompts instead (256 "
                    "tokens from the middle of files of the rich package, outside the training corpus): what prompt "
                    "lookup is for")
    ap.add_argument("--draft", nargs="*", default=["auto"], help="drafts for speculative rows: built model names, "
                    "HF dirs, or none; auto: code-draft-kd and code-draft-sd with code-tiny")
    ap.add_argument("--xdraft", nargs="*", default=["auto"], help="drafts with another tokenizer for uag rows: built "
                    "model names, HF dirs, or none; auto: code-draft-xtok and code-draft-xtok-sd with code-tiny")
    ap.add_argument("--traced", action="store_true", help="also time autoregressive with the traced forward "
                    "(target.forward: traced) beside the one every other row uses (auto: contrib on the CPU)")
    ap.add_argument("--direct", action="store_true", help="also time autoregressive with the plain direct forward "
                    "(target.forward: direct, no onnxruntime contrib ops)")
    ap.add_argument("--heuristic", nargs="*", type=int, default=[8], help="k_max of speculative and uag rows with "
                    "k_schedule heuristic (k + 2 after a step that accepted all, else k - 1; starting at k 3)")
    ap.add_argument("--confidence", nargs="*", type=float, default=[0.4], help="the heuristic rows again with "
                    "strategy.confidence (the draft's chain stops after a proposal it gives less than this; 0.4: "
                    "the shipped specs')")
    ap.add_argument("--k", nargs="*", type=int, default=[2, 4], help="speculative / uag proposal lengths")
    ap.add_argument("--unfused-k", nargs="*", type=int, default=[3], help="also time these k with the draft in its "
                    "own draft.onnx (strategy.fused false: two calls per step) beside the fused step")
    ap.add_argument("--sample-k", nargs="*", type=int, default=[3], help="sampling rows (temperature 0.8, "
                    "top-k 50) at these k: speculative fused and unfused, uag; plus lookahead at the first --configs; "
                    "beside autoregressive sampling; tokens are not compared")
    ap.add_argument("--sample-draft", default="auto", help="the draft of the sampled speculative rows; auto: "
                    "code-draft-kd with code-tiny (KL-distilled: its q is closest to the target's p), else the last "
                    "--draft")
    ap.add_argument("--recycle", nargs="*", default=["auto"], help="recyclable modules for recycle rows (strategy "
                    "recycle, lossless): built names or dirs, or none; auto: code-tiny-recycle with code-tiny")
    ap.add_argument("--recycle-k", nargs="*", type=int, default=[3, 4, 6], help="recycle proposal lengths")
    ap.add_argument("--recycle-heuristic", nargs="*", type=int, default=[8], help="k_max of recycle rows with "
                    "k_schedule heuristic (the chain a loop: k + 2 after a step that accepted all, else k - 1; "
                    "starting at k 3)")
    ap.add_argument("--recycle-fallback", nargs="*", type=int, default=[], help="also time the recycle rows with "
                    "strategy.draft_max_batch N (calls of more than N rows run autoregressive decoding)")
    ap.add_argument("--fallback", type=int, default=0, help="compile every multi-token row with "
                    "strategy.draft_max_batch N: a --batch above N then runs each as autoregressive decoding")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds of the dgopt rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: artifacts on ORT's CUDA EP (IO binding, KV on the GPU; needs onnxruntime-gpu) and "
                         "transformers on the GPU; timings synchronise the device")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    if not 1 <= a.batch <= 8:
        ap.error(f"--batch {a.batch}: must be 1..8 (the benchmark specs' target.max_batch)")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(a.threads)

    import dgopt
    from dgopt.models.hf import load_model
    from dgopt.spec import spec_from_dict
    base = model_spec(a.model)
    base["target"]["device"] = a.device
    dev = torch.device(a.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
    lm = load_model(spec_from_dict(base).model, lambda p: Path(p))
    model = lm.model.to(dev)
    prompts = code_prompts(lm, a.code_prompts) if a.code_prompts else prompts_for(lm, a.prompts)
    tmp = Path(tempfile.mkdtemp())

    def hf_run(**kw):
        outs, t = [], time.perf_counter()
        for p in prompts:
            ids = torch.tensor([p], device=dev)
            with torch.no_grad():
                o = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new, do_sample=False,
                                   pad_token_id=0, **kw)
            outs.append(o[0, len(p):].tolist())
        sync()
        return outs, time.perf_counter() - t

    ref, _ = hf_run()
    rows = []

    partial = Path(a.out) / "strategies.json"

    def add(name, outs, secs, steps=None, extra=None, row_steps=None):
        toks = sum(len(o) for o in outs)
        row_steps = row_steps or steps          # a batch's step advances every row in it
        rows.append({"name": name, "tokens_per_s": toks / secs,
                     "tokens_per_step": toks / row_steps if row_steps else None,
                     "ms_per_step": 1e3 * secs / steps if steps else None,
                     "identical": outs == ref, **(extra or {})})
        # each row as it completes: a run stopped at its time limit keeps the rows it measured
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"partial": True, "device": a.device, "rows": rows}, indent=2))

    add("transformers greedy", *hf_run())
    add("transformers prompt lookup (10)", *hf_run(prompt_lookup_num_tokens=10))

    def as_model(name):
        return {"path": str(Path(name).resolve())} if Path(name).is_dir() else {"name": name}

    drafts = a.draft
    if drafts == ["auto"]:
        drafts = ["code-draft-kd", "code-draft-sd"] if base["model"].get("name") == "code-tiny" else []
    drafts = [d for d in drafts if d != "none"]
    for d in drafts:
        dlm = load_model(spec_from_dict({"model": as_model(d)}).model, lambda p: Path(p))
        add(f"transformers assisted ({d})", *hf_run(assistant_model=dlm.model.to(dev)))

    xdrafts = a.xdraft
    if xdrafts == ["auto"]:
        xdrafts = ["code-draft-xtok", "code-draft-xtok-sd"] if base["model"].get("name") == "code-tiny" else []
    xdraft_specs = {d: as_model(d) for d in xdrafts if d != "none"}
    if xdraft_specs:
        from transformers import AutoTokenizer
        ttok = AutoTokenizer.from_pretrained(lm.tokenizer_dir)
    for d, xspec in xdraft_specs.items():
        xlm = load_model(spec_from_dict({"model": xspec}).model, lambda p: Path(p))
        dtok = AutoTokenizer.from_pretrained(xlm.tokenizer_dir)
        add(f"transformers UAG ({d})", *hf_run(assistant_model=xlm.model.to(dev), tokenizer=ttok,
                                              assistant_tokenizer=dtok))

    strategies = [("autoregressive", {"kind": "autoregressive"})]
    for flag, fwd in ((a.traced, "traced"), (a.direct, "direct")):
        if flag:
            strategies.append((f"autoregressive ({fwd} forward)", {"kind": "autoregressive"},
                               {"target": {**base["target"], "forward": fwd}}))
    for c in a.configs:
        W, N, G = map(int, c.split(","))
        strategies.append((f"lookahead W{W} N{N} G{G}", {"kind": "lookahead", "window": W, "ngram": N, "guesses": G}))
    for n in a.jacobi:
        strategies.append((f"jacobi n{n}", {"kind": "jacobi", "block": n}))
    for c in a.ngram:
        k, G = map(int, c.split(","))
        strategies.append((f"ngram k{k} G{G}", {"kind": "ngram", "k": k, "guesses": G}))
    for d in drafts:
        for k in a.k:
            strategies.append((f"speculative k{k} ({d})", {"kind": "speculative", "k": k}, {"draft": as_model(d)}))
        for k in a.unfused_k:
            strategies.append((f"speculative k{k} ({d}, unfused)", {"kind": "speculative", "k": k, "fused": False},
                               {"draft": as_model(d)}))
        for km in a.heuristic:
            for c in [0.0] + a.confidence:
                strategies.append((f"speculative heuristic k3..{km}{f' conf {c:g}' if c else ''} ({d})",
                                   {"kind": "speculative", "k": min(3, km), "k_schedule": "heuristic", "k_max": km,
                                    "confidence": c}, {"draft": as_model(d)}))
    for d, xspec in xdraft_specs.items():
        for k in a.k:
            strategies.append((f"uag k{k} ({d})", {"kind": "uag", "k": k}, {"draft": xspec}))
        for km in a.heuristic:
            for c in [0.0] + a.confidence:
                strategies.append((f"uag heuristic k3..{km}{f' conf {c:g}' if c else ''} ({d})",
                                   {"kind": "uag", "k": min(3, km), "k_schedule": "heuristic", "k_max": km,
                                    "confidence": c}, {"draft": xspec}))
    modules = a.recycle
    if modules == ["auto"]:
        modules = ["code-tiny-recycle"] if base["model"].get("name") == "code-tiny" else []
    for r in (r for r in modules if r != "none"):
        rspec = {"path": str(Path(r).resolve())} if Path(r).is_dir() else {"name": r}
        for k in a.recycle_k:
            strategies.append((f"recycle k{k} ({r})", {"kind": "recycle", "k": k}, {"recycle": rspec}))
            for n in a.recycle_fallback:
                strategies.append((f"recycle k{k} ({r}, autoregressive above batch {n})",
                                   {"kind": "recycle", "k": k, "draft_max_batch": n}, {"recycle": rspec}))
        for km in a.recycle_heuristic:
            strategies.append((f"recycle heuristic k3..{km} ({r})", {"kind": "recycle", "k": min(3, km),
                                                                     "k_schedule": "heuristic", "k_max": km},
                               {"recycle": rspec}))
    sample = {"kind": "sample", "temperature": 0.8, "top_k": 50, "seed": 0}
    if a.sample_k:      # sampled rows, timed against autoregressive sampling
        strategies.append(("autoregressive (sample)", {"kind": "autoregressive"}, {"sampling": sample}))
        W, N, G = map(int, a.configs[0].split(",")) if a.configs else (4, 3, 4)
        strategies.append((f"lookahead W{W} N{N} G{G} (sample)",
                           {"kind": "lookahead", "window": W, "ngram": N, "guesses": G}, {"sampling": sample}))
        if a.ngram:
            k, G = map(int, a.ngram[0].split(","))
            strategies.append((f"ngram k{k} G{G} (sample)", {"kind": "ngram", "k": k, "guesses": G},
                               {"sampling": sample}))
        sdraft = a.sample_draft
        if sdraft == "auto":
            sdraft = "code-draft-kd" if base["model"].get("name") == "code-tiny" else (drafts[-1] if drafts else None)
        for k in a.sample_k:
            for fused in (True, False) if sdraft else ():
                strategies.append((f"speculative k{k} ({sdraft}, sample{'' if fused else ', unfused'})",
                                   {"kind": "speculative", "k": k, "fused": fused},
                                   {"draft": as_model(sdraft), "sampling": sample}))
            if xdraft_specs:
                d = list(xdraft_specs)[-1]
                strategies.append((f"uag k{k} ({d}, sample)", {"kind": "uag", "k": k},
                                   {"draft": xdraft_specs[d], "sampling": sample}))
            for r in (r for r in modules if r != "none"):
                rspec = {"path": str(Path(r).resolve())} if Path(r).is_dir() else {"name": r}
                strategies.append((f"recycle k{k} ({r}, sample)", {"kind": "recycle", "k": k},
                                   {"recycle": rspec, "sampling": sample}))
    if a.fallback:
        strategies = [(f"{name} (autoregressive above batch {a.fallback})", {**st, "draft_max_batch": a.fallback},
                       *extra) if st["kind"] != "autoregressive" and "draft_max_batch" not in st else (name, st, *extra)
                      for name, st, *extra in strategies]
    decs = []
    for name, st, *extra in strategies:
        for lvl in ((0, 2) if st["kind"] == "lookahead" and "sample" not in name else (2,)):
            art = dgopt.compile({**base, **(extra[0] if extra else {}), "strategy": st},
                                tmp / f"{len(decs)}-{name}-{lvl}".replace(" ", "_"), opt_level=lvl)
            dec = dgopt.load(art, device=a.device, threads=a.threads)
            dec.generate(prompts[0], max_new_tokens=8)     # warm-up
            fb = dec.manifest.get("fallback")
            if fb and a.batch > fb["above_batch"]:          # load the fallback before the timing
                dec.generate([prompts[0]] * a.batch, max_new_tokens=8)
            decs.append((f"dgopt {name} -O{lvl}", dec))

    # each row runs all prompts as one block right after a block of its baseline (autoregressive, greedy or sampled),
    # and its ratio is taken against that adjacent block: drift over minutes cancels, and a block runs one artifact
    # warm as a server would. (Alternating artifacts prompt by prompt instead made every row ~1.7x slower here:
    # each switch leaves the other session's thread pool spinning and its weights evicted.)
    base_of = {name: ("dgopt autoregressive (sample) -O2" if "sample" in name else "dgopt autoregressive -O2")
               for name, _ in decs}
    by_name = dict(decs)

    def block(name):
        r = {"outs": [], "secs": 0.0, "steps": 0, "row_steps": 0, "acc": []}
        for i in range(0, len(prompts), a.batch):
            chunk = prompts[i:i + a.batch]
            t = time.perf_counter()
            g = by_name[name].generate(chunk, max_new_tokens=a.new)
            r["secs"] += time.perf_counter() - t
            r["outs"].extend(g.ids)
            r["steps"] += g.stats["steps"]
            r["row_steps"] += g.stats["steps"] * len(chunk)
            r["acc"].append(g.stats.get("acceptance_rate"))
        return r
    rounds = []
    for _ in range(a.repeats):
        res = {}
        for name, _ in decs:
            if name in base_of.values():
                continue
            b = block(base_of[name])
            res.setdefault(base_of[name] + " blocks", []).append(b)
            res[name] = block(name)
            res[name]["base"] = b
        for bname in set(base_of.values()):
            blocks = res.pop(bname + " blocks", None) or [block(bname)]
            res[bname] = {**blocks[-1], "secs": statistics.median(x["secs"] for x in blocks), "base": None}
        rounds.append(res)
    def tps(r):
        return sum(len(o) for o in r["outs"]) / r["secs"]
    for name, _ in decs:
        last = rounds[-1][name]
        ratio = statistics.median(tps(rd[name]) / tps(rd[name]["base"]) if rd[name]["base"] else 1.0
                                  for rd in rounds)
        secs = statistics.median(rd[name]["secs"] for rd in rounds)
        extra = {"ratio": ratio}
        if "sample" in name:
            extra["identical"] = None       # sampled: tokens are not compared
        if last["acc"][0] is not None:
            extra["acceptance_rate"] = statistics.mean(last["acc"])
        add(name, last["outs"], secs, last["steps"], extra, last["row_steps"])

    ar = next(r for r in rows if r["name"].startswith("dgopt autoregressive"))
    ar_s = next((r for r in rows if r["name"].startswith("dgopt autoregressive (sample)")), None)
    gpu = f"; {torch.cuda.get_device_name()}" if dev.type == "cuda" else ""
    # label rows by the provider each session actually started on (onnxruntime can drop CUDA with a log line)
    ran = {n: dec.session.providers[0] for n, dec in decs}
    for r in rows:
        if r["name"] in ran:
            r["provider"] = ran[r["name"]]
    providers = sorted(set(ran.values()))
    print(f"machine: {machine()}; onnxruntime {', '.join(providers)}, {a.threads} threads{gpu}")
    print(f"model: {lm.source} ({lm.info['num_parameters'] / 1e6:.2f} M params); {len(prompts)} "
          f"{'code prompts (rich, 256 tokens)' if a.code_prompts else 'prompts'} x {a.new} "
          f"new tokens, batch {a.batch} (transformers rows: batch 1), greedy")
    print(f"{'':52s} {'tok/s':>8s} {'vs AR':>7s} {'vs HF':>7s} {'tok/step':>9s} {'ms/step':>8s} {'accept':>7s}"
          "  identical")
    hf = rows[0]["tokens_per_s"]
    nan = float("nan")
    for r in rows:
        sampled = "sample" in r["name"]
        base = ar_s if sampled else ar
        ratio = r.get("ratio", r["tokens_per_s"] / base["tokens_per_s"])
        print(f"{r['name']:52s} {r['tokens_per_s']:8.1f} {ratio:6.2f}x "
              f"{r['tokens_per_s'] / hf:6.2f}x {r['tokens_per_step'] or nan:9.2f} "
              f"{r['ms_per_step'] or nan:8.2f} {r.get('acceptance_rate', nan):7.2f}  "
              f"{'(sampled)' if sampled else r['identical']}")
    print("tok/step: tokens per target forward; accept: accepted draft tokens / proposed; sampled rows: 'vs AR' is "
          "against autoregressive sampling, tokens not compared (distributions are tested in tests/)")
    for r in rows:
        if r["name"].endswith("-O2") and "lookahead" in r["name"] and "sample" not in r["name"]:
            r0 = next(x for x in rows if x["name"] == r["name"][:-3] + "-O0")
            print(f"merge_forwards per-step speedup {r['name'][6:-4]}: {r0['ms_per_step'] / r['ms_per_step']:.2f}x")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "strategies.json").write_text(json.dumps({"machine": machine() + gpu, "device": a.device,
                                                     "providers": providers,
                                                     "model": lm.source,
                                                     "params": lm.info["num_parameters"], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
