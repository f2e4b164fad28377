"""Load test of `dgopt serve` on loopback (127.0.0.1 only): throughput, latency p50/p99 and time-to-first-token p99
at several numbers of concurrent streaming clients, for each spec, against the same requests sent one at a time; and
the server's overhead per token against the in-process generate that `dgopt run` calls. Every greedy response is
checked against its one-at-a-time generate output. Bounded: a fixed number of requests per level and an overall
time limit, after which it stops sending and reports what it has.

    nice -n 19 python benchmarks/serve_load.py [--specs specs/greedy.yaml specs/speculative.yaml]
        [--clients 1 4 16 64] [--max-tokens 64] [--time-limit 1200]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import PY_PROMPTS, machine  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compile(spec: Path, out: Path) -> Path:
    import dgopt
    art = out / spec.stem
    if not (art / "manifest.json").exists():
        print(f"compiling {spec} -> {art}", flush=True)
        dgopt.compile(str(spec), art)
    return art


def _load(art: Path, prompts: list[str], max_tokens: int, threads: int | None):
    """The artifact in this process, warmed up, and what `dgopt run` returns for each prompt."""
    import dgopt
    dec = dgopt.load(art, threads=threads)
    want = [dec.generate(p, max_new_tokens=max_tokens).ids[0] for p in prompts]
    return dec, want


def _run_like_dgopt_run(dec, prompt: str, max_tokens: int) -> float:
    """Seconds for one `dgopt run`-style generate (streaming callback included)."""
    acc: list[int] = []
    t = time.perf_counter()
    dec.generate(prompt, max_new_tokens=max_tokens, on_token=lambda toks: acc.append(toks[0]))
    return time.perf_counter() - t


def _overhead(dec, url: str, prompts: list[str], max_tokens: int, deadline: float) -> dict:
    """The server at one client against dgopt run's generate, request by request in alternation (the machine's
    load drifts; alternating pairs see the same moment): median over pairs of server time / generate time."""
    import httpx
    ratios, srv, run, toks = [], 0.0, 0.0, 0
    with httpx.Client() as client:
        for p in prompts * 2:
            if time.monotonic() > deadline:
                break
            t_run = _run_like_dgopt_run(dec, p, max_tokens)
            t = time.perf_counter()
            n = 0
            with client.stream("POST", url, json={"prompt": p, "max_tokens": max_tokens, "stream": True},
                               timeout=600) as r:
                for line in r.iter_lines():
                    n += line.startswith("data: ")
            t_srv = time.perf_counter() - t
            ratios.append(t_srv / t_run)
            srv, run, toks = srv + t_srv, run + t_run, toks + n
    return {"pairs": len(ratios), "median_ratio": float(np.median(ratios)) if ratios else None,
            "server_ms_per_request": 1e3 * srv / max(len(ratios), 1),
            "run_ms_per_request": 1e3 * run / max(len(ratios), 1)}


async def _one(client, url: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, toks = None, []
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "return_token_ids": True}
    async with client.stream("POST", url, json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if "error" in c:
                raise RuntimeError(c["error"]["message"])
            got = c["choices"][0].get("token_ids") or []
            if got and first is None:
                first = time.perf_counter()
            toks += got
    end = time.perf_counter()
    return {"ids": toks, "latency": end - t0, "ttft": (first or end) - t0}


async def _level(url: str, jobs: list[tuple[int, int]], prompts: list[str], clients: int,
                 deadline: float) -> tuple[list[tuple[tuple[int, int], dict]], float]:
    """jobs: (prompt index, max_tokens) each."""
    import httpx
    queue = list(jobs)
    done: list[tuple[tuple[int, int], dict]] = []

    async def worker(client):
        while queue and time.monotonic() < deadline:
            i, mt = queue.pop(0)
            done.append(((i, mt), await _one(client, url, prompts[i], mt)))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        t = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return done, time.perf_counter() - t


def _calls(base: str) -> tuple[float, float]:
    """(generate calls, rows in them) so far, from the server's metrics."""
    import httpx
    m = {line.split()[0]: float(line.split()[-1]) for line in httpx.get(base + "/metrics").text.splitlines()
         if line.startswith(("dgopt_batch_size_count", "dgopt_batch_size_sum"))}
    return m.get("dgopt_batch_size_count", 0.0), m.get("dgopt_batch_size_sum", 0.0)


def bench_spec(spec: Path, out: Path, levels: list[int], max_tokens: int, deadline: float,
               threads: int | None, stream_interval: float = 0.0, rounds: int = 1, serve_args=(),
               mixed: bool = False) -> dict:
    art = _compile(spec, out)
    prompts = PY_PROMPTS
    dec, want = _load(art, prompts, max_tokens * 7 // 4 if mixed else max_tokens, threads)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dgopt", "serve", str(art), "--host", "127.0.0.1", "--port",
                             str(port), "--stream-interval", str(stream_interval), *serve_args]
                            + (["--threads", str(threads)] if threads else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/completions"
    rows = []
    try:
        import httpx
        t_end = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > t_end:
                raise RuntimeError("server did not start")
            time.sleep(0.5)
        asyncio.run(_level(url, [(0, 8), (1, 8)], prompts, 2, deadline))           # warm-up
        for rnd, c in ((r, c) for r in range(rounds) for c in levels):
            n = max(2 * c, 2 * len(prompts))        # requests at this level: every prompt, at least twice
            # mixed: max_tokens cycles through 1/4, 1/2, 1, 3/2 and 7/4 of --max-tokens (the same mean)
            lengths = [max(1, max_tokens * f // 4) for f in (1, 2, 4, 6, 7)] if mixed else [max_tokens]
            jobs = [(i % len(prompts), lengths[(i * 3) % len(lengths)]) for i in range(n)]
            calls0 = _calls(base)
            done, wall = asyncio.run(_level(url, jobs, prompts, c, deadline))
            calls = [a - b for a, b in zip(_calls(base), calls0)]
            wrong = sum(r["ids"] != want[i][:mt] for (i, mt), r in done)
            tokens = sum(len(r["ids"]) for _, r in done)
            lat = np.array([r["latency"] for _, r in done]) * 1e3
            ttft = np.array([r["ttft"] for _, r in done]) * 1e3
            row = {"round": rnd, "clients": c, "requests": len(done), "planned": n, "tokens": tokens, "seconds": wall,
                   "tokens_per_s": tokens / wall, "p50_ms": float(np.percentile(lat, 50)),
                   "p99_ms": float(np.percentile(lat, 99)), "ttft_p50_ms": float(np.percentile(ttft, 50)),
                   "ttft_p99_ms": float(np.percentile(ttft, 99)), "mismatches": wrong,
                   "rows_per_call": calls[1] / calls[0] if calls[0] else None}
            rows.append(row)
            print(f"  {spec.stem:12s} {c:3d} clients: {row['tokens_per_s']:7.1f} tok/s  p50 {row['p50_ms']:7.0f} "
                  f"ms  p99 {row['p99_ms']:7.0f} ms  TTFT p99 {row['ttft_p99_ms']:6.0f} ms  "
                  f"{row['rows_per_call'] or 0:.1f} rows/call ({len(done)}/{n} requests, {wrong} mismatches)", flush=True)
            if time.monotonic() > deadline:
                print("  time limit reached: stopping", flush=True)
                break
        overhead = _overhead(dec, url, prompts, max_tokens, deadline)
        metrics = httpx.get(base + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tps = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
           if line.startswith(("dgopt_tokens_per_step_sum", "dgopt_tokens_per_step_count"))}
    return {"spec": str(spec), "artifact": str(art), "rows": rows, "overhead": overhead,
            "tokens_per_step": tps["dgopt_tokens_per_step_sum"] / tps["dgopt_tokens_per_step_count"]
            if tps.get("dgopt_tokens_per_step_count") else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", default=["specs/greedy.yaml", "specs/speculative.yaml"])
    ap.add_argument("--clients", nargs="*", type=int, default=[1, 4, 16, 64], help="concurrency levels (none: "
                    "only the overhead against dgopt run)")
    ap.add_argument("--stream-interval", type=float, default=0.0, metavar="MS", help="the server's --stream-interval")
    ap.add_argument("--mixed", action="store_true", help="requests of mixed lengths: max_tokens cycles through 1/4, "
                    "1/2, 1, 3/2 and 7/4 of --max-tokens (what continuous batching is for: next-batch batching "
                    "waits for a call's longest row)")
    ap.add_argument("--no-continuous", action="store_true", help="the server's --no-continuous (next-batch only)")
    ap.add_argument("--rounds", type=int, default=1, help="run the levels this many times in turn; the table gives "
                    "medians, 'vs 1 client' the median of each round's ratio (this machine drifts by 10-40%% over "
                    "minutes: a ratio of levels run minutes apart measures the drift)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=1200, help="seconds for the whole run (default 1200)")
    ap.add_argument("--out", default="out/bench/serve")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the server and of the in-process "
                    "generate (default 1: on a shared machine two spinning thread pools, the server's and the "
                    "baseline's, fight for the cores; 0: all cores)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.time_limit
    print(f"machine: {machine()}; loopback 127.0.0.1; max_tokens {a.max_tokens}; {len(PY_PROMPTS)} Python prompts; "
          f"onnxruntime threads {a.threads or 'all'}; server --stream-interval {a.stream_interval:g} ms"
          f"{' --no-continuous' if a.no_continuous else ''}{'; mixed lengths' if a.mixed else ''}",
          flush=True)
    results = [bench_spec(Path(s), out, a.clients, a.max_tokens, deadline, a.threads or None, a.stream_interval,
                          a.rounds, ["--no-continuous"] if a.no_continuous else [], a.mixed) for s in a.specs]
    print("\n| spec | clients | requests | tok/s | vs 1 client | rows/call | p50 ms | p99 ms | TTFT p99 ms | mismatches |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        by_round = {(x["round"], x["clients"]): x for x in r["rows"]}
        for c in dict.fromkeys(x["clients"] for x in r["rows"]):
            xs = [x for x in r["rows"] if x["clients"] == c]
            ratios = [x["tokens_per_s"] / by_round[(x["round"], 1)]["tokens_per_s"] for x in xs
                      if (x["round"], 1) in by_round]
            med = lambda k: float(np.median([x[k] for x in xs]))  # noqa: E731
            ratio = f"{np.median(ratios):.2f}x" if ratios else "-"
            spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            print(f"| {Path(r['spec']).stem} | {c} | {sum(x['requests'] for x in xs)} | {med('tokens_per_s'):.1f} "
                  f"| {ratio}{spread} | {med('rows_per_call') if all(x['rows_per_call'] for x in xs) else 0:.1f} "
                  f"| {med('p50_ms'):.0f} | {med('p99_ms'):.0f} | {med('ttft_p99_ms'):.0f} "
                  f"| {sum(x['mismatches'] for x in xs)} |")
    print()
    for r in results:
        o = r["overhead"]
        if o["median_ratio"] is not None:
            print(f"{Path(r['spec']).stem}: one client, streamed, against dgopt run's generate on the same prompt "
                  f"({o['pairs']} alternating pairs): server {o['server_ms_per_request']:.1f} ms vs "
                  f"{o['run_ms_per_request']:.1f} ms per request, median overhead {(o['median_ratio'] - 1) * 100:+.1f}% "
                  f"(tokens per step {r['tokens_per_step'] or 0:.2f})")
    (out / "serve_load.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return 1 if any(x["mismatches"] for r in results for x in r["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
