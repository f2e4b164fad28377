"""dgopt command line. Bad input exits 2 with one line `error: ...` (add --debug for the traceback)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import DgoptError
from .version import __version__

EPILOG = """examples:
  dgopt compile specs/greedy.yaml -o out/greedy
  dgopt run out/greedy --prompt "def fib(n):"
  dgopt run out/greedy --ids 1,2,3 --max-new-tokens 32 --json
  dgopt serve out/greedy --port 8000
  dgopt inspect out/greedy --no-browser
  dgopt check specs/lookahead.yaml --target tensorrt
  dgopt tune specs/lookahead.yaml -o tuned.yaml    # measure configs here, write the fastest
  dgopt models list
  dgopt train lm code-tiny -o out/tiny-ft --data mycode/ --minutes 10

strategies (spec strategy.kind; examples in specs/):
  autoregressive  one token per step, processors + sampler in the graph (greedy.yaml, sample.yaml)
  lookahead       Jacobi window + n-gram pool, both branches in one forward (lookahead.yaml);
                  greedy, or sampling by matching per-depth draws (as jacobi and uag)
  jacobi          guess block refined every step (jacobi.yaml)
  speculative     draft model proposes k tokens, the target verifies in one forward; greedy or
                  rejection sampling (speculative.yaml, speculative-sample.yaml)
  uag             speculative with a draft of another tokenizer, through text (uag.yaml)
  ngram           prompt lookup: continuations of the context's longest repeated suffix (ngram.yaml)
"""


def _console():
    from rich.console import Console
    return Console(stderr=True, soft_wrap=True)     # long stat lines stay one line in logs


def _stage_progress(console, quiet: bool):
    """A spinner per compile stage, finished stages ticked off with their time."""
    import time

    @contextlib.contextmanager
    def stage(name: str):
        t = time.perf_counter()
        if quiet or not console.is_terminal:   # logs and pipes get only the final line
            yield
            return
        with console.status(f"[bold]{name}…"):
            yield
        console.print(f"  [green]✓[/] {name} [dim]({time.perf_counter() - t:.2f}s)[/]")
    return stage


def cmd_compile(a) -> int:
    from .pipeline import compile as dg_compile
    console = _console()
    out = a.output or str(Path("out") / Path(a.spec).stem)
    import time
    t = time.perf_counter()
    spec = a.spec
    if a.tune:          # measure first, compile the tuned spec (written beside the artifact for the record)
        from .tune import print_table, tune
        spec = str(Path(out).with_name(Path(out).name + ".tuned.yaml"))
        rep = tune(a.spec, spec, overrides=a.set or [], progress=not a.quiet and console.is_terminal)
        if not a.quiet:
            print_table(rep, console)
        a.set = []
    path = dg_compile(spec, out, opt_level=a.O, disable=a.disable_pass or [], dump_passes=a.dump_passes,
                      verify_each=a.verify_each, overrides=a.set or [], progress=_stage_progress(console, a.quiet))
    m = json.loads((path / "manifest.json").read_text())
    ran = ", ".join(f"{p['name']}{'' if p['modified'] else ' (no change)'}" for p in m["pipeline"]["passes"])
    if not a.quiet:
        console.print(f"[bold green]compiled[/] {path} in {time.perf_counter() - t:.1f}s  "
                      f"[dim]-O{a.O}: {ran or 'no passes'}[/]")
    print(path)
    return 0


def _parse_ids(text: str) -> list[list[int]]:
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";") if row.strip()]
    except ValueError:
        raise DgoptError(f"--ids '{text}': expected comma-separated integers (rows separated by ';')") from None
    if not rows or not all(rows):
        raise DgoptError(f"--ids '{text}': empty prompt (give at least one token id per row: 1,2,3)")
    return rows


def cmd_run(a) -> int:
    from .runtime import load
    if a.max_new_tokens < 1:    # before loading: 0 would return nothing, a negative count silently the same
        raise DgoptError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    if (a.prompt is None) == (a.ids is None):
        raise DgoptError("give exactly one of --prompt TEXT or --ids 1,2,3")
    ids = _parse_ids(a.ids) if a.ids is not None else None
    dec = load(a.artifact, device=a.device, threads=a.threads)
    try:
        prompts = ids if ids is not None else [dec.encode(a.prompt)]
    except ValueError as e:
        raise DgoptError(str(e)) from None
    has_tok = bool(dec.manifest.get("tokenizer"))
    stream = not a.json and not a.no_stream and len(prompts) == 1 and has_tok
    printed = ""
    acc: list[int] = []
    if stream and a.prompt is not None:
        sys.stdout.write(a.prompt)

    def on_token(toks):
        nonlocal printed
        if toks[0] is None:
            return
        acc.append(toks[0])
        text = dec.decode(acc)
        if not text.endswith("\ufffd"):         # wait for a complete UTF-8 character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    try:
        res = dec.generate(prompts, max_new_tokens=a.max_new_tokens, seed=a.seed, on_token=on_token if stream else None)
    except ValueError as e:
        raise DgoptError(str(e)) from None
    texts = [dec.decode(r) for r in res.ids] if has_tok else None
    if a.json:
        one = len(prompts) == 1
        print(json.dumps({"ids": res.ids[0] if one else res.ids,
                          "text": (texts[0] if one else texts) if texts else None, "stats": res.stats}))
        return 0
    if stream:
        sys.stdout.write("\n")
    else:
        for b, r in enumerate(res.ids):
            print(texts[b] if texts else ",".join(map(str, r)))
    sys.stdout.flush()                                  # before the stats line on stderr
    s = res.stats
    hist = s.get("accepted_hist")
    accepted = f"; accepted per step: {', '.join(f'{k}x{v}' for k, v in hist.items())}" if hist else ""
    if "acceptance_rate" in s and dec.manifest["strategy"]["kind"] == "ngram":
        accepted += f"; n-gram proposals: {s['mean_k']:.1f} per step, {s['acceptance_rate']:.2f} accepted"
    elif s.get("fallback"):
        accepted += f"; {s['fallback']} (more rows than strategy.draft_max_batch)"
    elif s.get("lossy"):
        accepted += "; LOSSY (verify: false): the module's tokens were committed unverified, not the target's output"
    elif "acceptance_rate" in s:
        st = dec.manifest["strategy"]
        varies = ", ".join(([] if st.get("k_schedule") != "heuristic" else ["k adapts"])
                           + ([f"stops below confidence {st['confidence']}"] if st.get("confidence") else []))
        accepted += f"; draft acceptance {s['acceptance_rate']:.2f}" + (
            f" of {s['mean_k']:.1f} proposals per step ({varies})" if varies else "") + ", " + (
            "draft and target fused in one call per step" if s.get("fused")
            else f"draft {s['draft_s']:.3f}s vs target {s['target_s']:.3f}s")
    _console().print(f"[dim]{s['new_tokens']} tokens in {s['steps']} steps ({s['tokens_per_step']:.2f} tokens/step, "
                     f"{dec.manifest['strategy']['kind']}), {s['tokens_per_s']:.1f} tokens/s, "
                     f"stop: {', '.join(sorted(set(s['stop'])))}{accepted}[/]")
    return 0


# dgopt serve's default --stream-interval (ms); measured in benchmarks/serve_load.py (docs/serving.md)
STREAM_INTERVAL_MS = 0.0


def cmd_serve(a) -> int:
    if not 0 < a.port < 65536:
        raise DgoptError(f"--port {a.port}: must be 1..65535")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise DgoptError("dgopt serve needs fastapi, uvicorn and prometheus_client: pip install 'dgopt[serve]'") \
            from None
    from .artifact import read_manifest
    cap = read_manifest(Path(a.artifact))["target"]["max_batch"]
    if a.max_batch is not None and not 1 <= a.max_batch <= cap:
        raise DgoptError(f"--max-batch {a.max_batch}: must be 1..{cap} (the artifact's target.max_batch)")
    if a.replicas != 1 and not a.ray:
        raise DgoptError("--replicas needs --ray")
    if not 0 <= a.stream_interval <= 1000:
        raise DgoptError(f"--stream-interval {a.stream_interval}: must be 0..1000 ms")
    if a.ray:
        from .serve.ray import run as run_ray
        return run_ray(a.artifact, a.host, a.port, a.replicas, max_batch=a.max_batch, model_name=a.model_name,
                       device=a.device, threads=a.threads, stream_interval=a.stream_interval / 1000,
                       continuous=not a.no_continuous)
    from .serve import create_app
    app = create_app(a.artifact, max_batch=a.max_batch, model_name=a.model_name, device=a.device,
                     threads=a.threads, stream_interval=a.stream_interval / 1000, continuous=not a.no_continuous)
    _console().print(f"serving {a.artifact} at http://{a.host}:{a.port}/v1 "
                     f"(max batch {app.state.server.batcher.max_batch}; Ctrl-C to stop)")
    uvicorn.run(app, host=a.host, port=a.port, log_level="debug" if a.debug else "warning")
    return 0


def cmd_inspect(a) -> int:
    from rich.table import Table
    from .artifact import read_manifest
    path = Path(a.artifact)
    m = read_manifest(path)
    console = _console()
    t = Table(title=f"dgopt artifact {path}", show_header=False)
    lossy = m["strategy"].get("verify") is False
    t.add_row("strategy", json.dumps(m["strategy"]) + ("  [bold red]LOSSY: verify false commits the recyclable "
                                                       "module's tokens unverified; the output is not the "
                                                       "target's[/]" if lossy else ""))
    t.add_row("sampling", json.dumps({k: v for k, v in m["sampling"].items()}))
    t.add_row("target", json.dumps(m["target"]))
    tuned = m.get("tuned")
    t.add_row("tuned", f"yes: {tuned.get('chosen')}, {tuned.get('vs_autoregressive')}x autoregressive on "
                       f"{tuned.get('machine')} ({tuned.get('date')})" if tuned else "no (hand-written config)")
    fwd = lambda info: f" · {info['forward']} forward" if info.get("forward") else ""   # noqa: E731
    t.add_row("model", f"{m['model']['family']} · {m['model']['num_parameters']:,} params · vocab "
                       f"{m['model']['vocab_size']} · {m['model']['source']}{fwd(m['model'])}")
    if m.get("draft"):
        d = m["draft"]["model"]
        tok = " · own tokenizer (draft_tokenizer/)" if m["draft"].get("tokenizer") else ""
        tok += " · fused into step.onnx" if m["draft"].get("fused") else " · draft.onnx"
        t.add_row("draft", f"{d['family']} · {d['num_parameters']:,} params · vocab {d['vocab_size']} · "
                           f"{d['source']}{fwd(d)}{tok}")
    if m.get("recycle"):
        r = m["recycle"]
        vocab = f" · draft vocabulary {r['draft_vocab_size']} tokens" if r.get("draft_vocab_size") else ""
        t.add_row("recycle", f"{r['params']:,} params · hidden {r['hidden_size']} · trained for {r['target']} (sha "
                             f"{r['target_sha']}){vocab} · {r['path']}" + (" · [bold red]LOSSY[/]" if lossy else ""))
    if m.get("fallback"):
        fb = m["fallback"]
        t.add_row("fallback", f"calls of more than {fb['above_batch']} rows run autoregressive decoding "
                              f"({fb['dir']}/step.onnx): strategy.draft_max_batch")
    t.add_row("passes", ", ".join(f"{p['name']}{'' if p['modified'] else ' (no change)'}"
                                  for p in m["pipeline"]["passes"]) or f"none (-O{m['pipeline']['opt_level']})")
    t.add_row("inputs", ", ".join(i["name"] for i in m["io"]["inputs"]))
    t.add_row("outputs", ", ".join(o["name"] for o in m["io"]["outputs"]))
    console.print(t)
    files = {rel: (path / rel).resolve() for rel in m["files"]}
    for rel in ("step.onnx", "draft.onnx", "ir.yaml", "ir.O0.yaml", "manifest.json"):
        if rel in files or rel == "manifest.json":
            print(f"{rel}\t{files.get(rel, (path / rel).resolve())}")
    if a.no_browser:
        return 0
    try:
        import netron
    except ImportError:
        console.print("[yellow]netron is not installed: pip install netron (or 'dgopt[netron]'), or open "
                      f"{files['step.onnx']} at https://netron.app[/]")
        return 0
    netron.start(str(files["step.onnx"]), address=("localhost", a.port), browse=True)
    console.print("[dim]serving in Netron; Ctrl-C to stop[/]")
    with contextlib.suppress(KeyboardInterrupt):
        netron.wait()
    return 0


def cmd_tune(a) -> int:
    from .tune import print_table, tune
    console = _console()
    rep = tune(a.spec, a.output, prompts=a.prompts, minutes=a.minutes, kinds=a.kinds, new=a.new_tokens,
               threads=a.threads, plot=a.plot or str(Path(a.output).with_suffix(".png")), overrides=a.set or [],
               progress=console.is_terminal, batches=a.batches)
    print_table(rep, console)
    wrote = f"{a.output} and {rep.plot}" if rep.plot else f"{a.output} (no plot: matplotlib is not installed)"
    console.print(f"wrote {wrote} in {rep.seconds:.0f}s")
    return 0


def cmd_check(a) -> int:
    """Static TensorRT check of a spec (compiled to ONNX in a temp dir) or an artifact; exit 1 on any error."""
    import tempfile
    from .backends.tensorrt import check_artifact, format_report
    path = Path(a.path)
    if path.is_dir() or path.suffix == ".onnx":
        findings = check_artifact(path, precision=a.precision)
    else:
        from .pipeline import compile as dg_compile
        from .spec import load_spec
        spec = load_spec(path, a.set or [])
        precision = a.precision or spec.target.precision
        # lowered as the tensorrt backend lowers it: for a GPU (so forward auto writes no contrib ops), fp16 for fp16
        target = spec.target.model_copy(update={"backend": "onnx", "device": "cuda",
                                                "precision": "fp16" if precision == "fp16" else "fp32"})
        spec = spec.model_copy(update={"target": target})
        with tempfile.TemporaryDirectory() as d:
            art = dg_compile(spec, Path(d) / "art", opt_level=a.O)
            findings = check_artifact(art, precision=precision)
    print(format_report(findings, title=f"TensorRT check of {path}"))
    return 1 if any(f.severity == "error" for f in findings) else 0


def cmd_passes(a) -> int:
    from .passes import PASSES
    from .pipeline import OPT_LEVELS
    for name, cls in PASSES.items():
        levels = ",".join(f"-O{k}" for k, v in OPT_LEVELS.items() if name in v)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:34s} {levels:10s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgopt", description="dgopt: compile LLM decoding strategies into fast, exact "
                                "step artifacts (spec.yaml -> IR -> passes -> ONNX) and run them.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--version", action="version", version=f"dgopt {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a spec into an artifact directory",
                       description="Compile SPEC (YAML) into an artifact dir: manifest.json, step.onnx, ir.yaml.")
    c.add_argument("spec", help="spec.yaml (see specs/ and the README's spec reference)")
    c.add_argument("-o", "--output", help="artifact dir to write (default: out/<spec name>); replaced atomically")
    c.add_argument("-O", type=int, default=2, choices=[0, 1, 2], metavar="LEVEL",
                   help="optimisation level: -O0 no passes (the baseline), -O1, -O2 (default); see `dgopt passes`")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set model.path=DIR --set sampling.temperature=0.7 (repeatable)")
    c.add_argument("--disable-pass", action="append", metavar="NAME",
                   help="skip one pass of the pipeline (repeatable; names: `dgopt passes`)")
    c.add_argument("--dump-passes", metavar="DIR", help="write the IR after every pass that changed it (each file "
                   "is a complete spec `dgopt compile` accepts)")
    c.add_argument("--verify-each", action="store_true", help="verify the IR after every pass")
    c.add_argument("-q", "--quiet", action="store_true", help="print only the artifact path")
    c.add_argument("--tune", action="store_true", help="run `dgopt tune` on the spec first (defaults) and compile "
                   "the tuned spec, written beside the artifact as OUTPUT.tuned.yaml")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="generate with a compiled artifact",
                       description="Load ARTIFACT and generate. Text prompts need an artifact with a tokenizer.")
    r.add_argument("artifact")
    r.add_argument("--prompt", help="text prompt (streams the continuation)")
    r.add_argument("--ids", help="token ids: 1,2,3 (a batch: 1,2;3,4,5)")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--seed", type=int, help="noise seed for sampling (default: the spec's sampling.seed)")
    r.add_argument("--json", action="store_true", help='print {"ids", "text", "stats"} as JSON')
    r.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    r.add_argument("--device", choices=["cpu", "cuda"], help="override the artifact's target device")
    r.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    r.set_defaults(fn=cmd_run)

    sv = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API",
                        description="POST /v1/completions (streaming with stream: true), GET /v1/models, /health, "
                        "/metrics (Prometheus). Concurrent requests share generate calls up to --max-batch rows.")
    sv.add_argument("artifact")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, help="most rows per generate call (default: the artifact's max_batch)")
    sv.add_argument("--model-name", help="the model id clients send (default: the artifact dir's name)")
    sv.add_argument("--stream-interval", type=float, default=STREAM_INTERVAL_MS, metavar="MS",
                    help="a stream's writes at most this often: the tokens of the steps in between go in one write "
                         f"(each write wakes the server and the client; default {STREAM_INTERVAL_MS:g}; 0: every step)")
    sv.add_argument("--no-continuous", action="store_true", help="next-batch batching only: a request waits for the "
                    "running generate call to end instead of joining it (greedy autoregressive artifacts join by "
                    "default; other strategies always batch next-batch)")
    sv.add_argument("--device", choices=["cpu", "cuda"], help="override the artifact's target device")
    sv.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    sv.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (a local Ray instance, or "
                    "the cluster in RAY_ADDRESS) behind Ray's HTTP proxy")
    sv.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    sv.set_defaults(fn=cmd_serve)

    i = sub.add_parser("inspect", help="show an artifact and open its step graph in Netron")
    i.add_argument("artifact")
    i.add_argument("--no-browser", action="store_true", help="only print the summary and file paths")
    i.add_argument("--port", type=int, default=8080)
    i.set_defaults(fn=cmd_inspect)

    ck = sub.add_parser("check", help="static check: would TensorRT's ONNX parser accept this step graph?",
                        description="Lists every node of the lowered step graph that the ONNX-TensorRT parser "
                        "would reject (error) or restrict (warning), from its published operator support matrix. "
                        "Runs without TensorRT. Exit 0: buildable; 1: errors; 2: bad input.")
    ck.add_argument("path", help="a spec.yaml (compiled to ONNX in a temp dir), an artifact dir, or a .onnx file")
    ck.add_argument("--target", default="tensorrt", choices=["tensorrt"])
    ck.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="engine precision (default: the spec's)")
    ck.add_argument("-O", type=int, default=2, choices=[0, 1, 2], metavar="LEVEL", help="optimisation level")
    ck.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key (repeatable)")
    ck.set_defaults(fn=cmd_check)

    tu = sub.add_parser("tune", help="measure strategy configurations on this machine, write the fastest spec",
                        description="Measures the step cost by positions per forward and each candidate "
                        "configuration of the spec's strategy (lookahead W/N/G, ngram k/guesses, speculative/uag "
                        "k and schedules, jacobi block, recycle k) against autoregressive decoding on sample "
                        "prompts; writes the fastest as a spec (autoregressive when nothing is faster), a table and a "
                        "PNG plot.")
    tu.add_argument("spec")
    tu.add_argument("-o", "--output", required=True, help="the tuned spec to write (YAML)")
    tu.add_argument("--prompts", help="prompts: a .json list of strings, .jsonl, or text with one per line "
                    "(default: held-out files of the stdlib corpus)")
    tu.add_argument("--minutes", type=float, default=4.0, help="time budget for measuring (default 4)")
    tu.add_argument("--kinds", nargs="*", help="strategy kinds to try (default: the spec's), e.g. lookahead ngram")
    tu.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    tu.add_argument("--plot", help="PNG to write (default: OUTPUT with .png)")
    tu.add_argument("--batches", nargs="*", type=int, default=[2, 4, 8], metavar="B",
                    help="batch sizes the chosen configuration is timed at against autoregressive (up to "
                    "target.max_batch; default 2 4 8): from the first where it is slower, calls run autoregressive "
                    "decoding (strategy.draft_max_batch); give none to skip")
    tu.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    tu.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key (repeatable)")
    tu.set_defaults(fn=cmd_tune)

    ps = sub.add_parser("passes", help="list the passes and the -O levels that run them")
    ps.set_defaults(fn=cmd_passes)

    from .training.cli import add_models_parser, add_train_parser
    add_models_parser(sub)
    add_train_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")    # transformers' weight-loading bars
    try:
        return args.fn(args)
    except (DgoptError, FileNotFoundError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
