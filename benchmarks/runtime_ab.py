"""The runtime of two checkouts side by side in one run, on the same compiled artifacts: for runtime refactors that
must not cost speed. Each checkout's Python runs a worker process that loads the artifacts and generates on request;
the workers take turns in blocks (A, B, B, A, ...: neither always goes first), and a spec's "B/A" is the median over
rounds of its tokens/s ratio in adjacent blocks. Compilation uses this checkout (the artifact format is shared).

    python benchmarks/runtime_ab.py --a /path/to/old/checkout/.venv/bin/python   # B: this checkout's interpreter
    python benchmarks/runtime_ab.py --a OLD_PY --specs specs/speculative.yaml --batch 1 8 --rounds 7

(specs/speculative.yaml sets strategy.draft_max_batch 2: its batch-8 calls run the autoregressive fallback; copy the
spec with draft_max_batch 0 to time speculative decoding itself at batch 8.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY_PROMPTS, machine  # noqa: E402

SPECS = ["greedy", "sample", "lookahead", "jacobi", "speculative", "speculative-sample", "uag"]
ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time
import dgopt
decs = {}
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "load":
        decs[cmd["name"]] = dgopt.load(cmd["path"], threads=cmd["threads"])
        print(json.dumps({"ok": dgopt.__file__}), flush=True)
        continue
    dec = decs[cmd["name"]]
    prompts = [dec.encode(p) for p in cmd["prompts"]]
    B, toks, ids = cmd["batch"], 0, []
    t = time.perf_counter()
    for i in range(0, len(prompts), B):
        res = dec.generate(prompts[i:i + B], max_new_tokens=cmd["new"], seed=0)
        toks += sum(len(r) for r in res.ids)
        ids += res.ids
    print(json.dumps({"s": time.perf_counter() - t, "tokens": toks, "ids": ids}), flush=True)
"""


class Worker:
    def __init__(self, python: str):
        self.p = subprocess.Popen([python, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=tempfile.gettempdir())

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.p.args[0]} died")
        return json.loads(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="Python of the baseline checkout (its venv's bin/python)")
    ap.add_argument("--b", default=sys.executable, help="Python of the checkout under test (default: this one)")
    ap.add_argument("--specs", nargs="*", default=[f"specs/{s}.yaml" for s in SPECS])
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "runtime_ab.json"))
    a = ap.parse_args()

    import dgopt
    tmp = Path(tempfile.mkdtemp())
    arts = {}
    for s in a.specs:
        name = Path(s).stem
        arts[name] = dgopt.compile(ROOT / s, tmp / name)
    workers = {"A": Worker(a.a), "B": Worker(a.b)}
    for w in workers.values():
        for name, path in arts.items():
            where = w.ask(op="load", name=name, path=str(path), threads=a.threads)["ok"]
        print(f"{w.p.args[0]}: dgopt from {where}", flush=True)
    prompts = PY_PROMPTS[:a.prompts]
    rows = []
    print(f"{machine()}; {a.prompts} prompts x {a.new} new tokens, {a.rounds} rounds, tokens/s of A and B\n")
    print(f"{'spec':<20}{'batch':>6}{'A tok/s':>10}{'B tok/s':>10}{'B/A':>8}  same tokens")
    for name in arts:
        for B in a.batch:
            ratios, ta, tb, same = [], [], [], True
            for r in range(a.rounds + 1):           # round 0 warms both up, untimed
                order = ("A", "B") if r % 2 else ("B", "A")
                got = {k: workers[k].ask(op="gen", name=name, prompts=prompts, new=a.new, batch=B) for k in order}
                same &= got["A"]["ids"] == got["B"]["ids"]
                if r:
                    sa, sb = (got[k]["tokens"] / got[k]["s"] for k in ("A", "B"))
                    ta.append(sa), tb.append(sb), ratios.append(sb / sa)
            row = {"spec": name, "batch": B, "a_tok_s": statistics.median(ta), "b_tok_s": statistics.median(tb),
                   "ratio": statistics.median(ratios), "same_tokens": same}
            rows.append(row)
            print(f"{name:<20}{B:>6}{row['a_tok_s']:>10.1f}{row['b_tok_s']:>10.1f}{row['ratio']:>8.3f}  {same}",
                  flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": machine(), "args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
