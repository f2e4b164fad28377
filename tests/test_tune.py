"""dgopt tune with injected timings (deterministic): it picks the faster of the configurations it timed, never
writes one slower than autoregressive (nor one inside the noise margin), skips what the cost curve rules out, and
the spec it writes compiles into an artifact whose manifest says it was tuned."""
import json
import subprocess
import sys

import pytest
import yaml

import dgopt
from conftest import tiny_spec
from dgopt.spec import load_spec
from dgopt.tune import MARGIN, Measured, candidates, tune

FLAT = {q: 1.0 for q in (1, 2, 4, 8, 16, 32, 64)}          # a GPU-like curve: more positions cost nothing


def fake(ratios: dict, calls: list):
    """ratios by configuration name, or by (name, batch) for batch > 1 (default: the batch-1 ratio)."""
    def measure(c, dec, prompts, batch):
        calls.append(c.name if batch == 1 else (c.name, batch))
        r = ratios.get(c.name, 0.5) if batch == 1 else ratios.get((c.name, batch), ratios.get(c.name, 0.5))
        return Measured(c, 100.0 * r, r, 2.0, 10.0)
    return measure


def run(tmp_path, ratios, cost=FLAT, spec=None):
    calls = []
    rep = tune(spec or tiny_spec("llama", strategy={"kind": "ngram", "k": 3}), tmp_path / "tuned.yaml",
               progress=False, measure=fake(ratios, calls), cost=lambda dec: cost, plot=tmp_path / "tuned.png")
    return rep, calls, yaml.safe_load((tmp_path / "tuned.yaml").read_text())


def test_picks_the_faster_of_two_and_writes_a_compilable_tuned_spec(tmp_path):
    rep, calls, written = run(tmp_path, {"ngram k2 G1": 1.3, "ngram k6 G1": 1.6})
    assert rep.chosen.name == "ngram k6 G1" and "ngram k2 G1" in calls
    assert written["strategy"] == {**rep.chosen.strategy} and written["strategy"]["k"] == 6
    assert written["tuned"]["chosen"] == "ngram k6 G1" and written["tuned"]["vs_autoregressive"] == 1.6
    text = (tmp_path / "tuned.yaml").read_text()
    assert "# Tuned by `dgopt tune`" in text and "ngram k2 G1: 130.0 tok/s, 1.30x" in text
    assert (tmp_path / "tuned.png").stat().st_size > 0
    art = dgopt.compile(load_spec(tmp_path / "tuned.yaml"), tmp_path / "art")
    assert json.loads((art / "manifest.json").read_text())["tuned"]["chosen"] == "ngram k6 G1"
    out = subprocess.run([sys.executable, "-m", "dgopt", "inspect", str(art), "--no-browser"], capture_output=True,
                         text=True)
    assert "ngram k6 G1" in out.stderr + out.stdout


@pytest.mark.parametrize("best", [0.9, MARGIN - 0.01], ids=["slower", "within_noise"])
def test_never_writes_a_config_slower_than_autoregressive(best, tmp_path):
    rep, calls, written = run(tmp_path, {"ngram k3 G1": best})
    assert len(calls) > 3                                       # they were measured, and all lost
    assert rep.chosen.strategy == {"kind": "autoregressive"} and written["strategy"] == {"kind": "autoregressive"}
    assert "autoregressive is the tuned choice" in (tmp_path / "tuned.yaml").read_text()


def test_a_win_that_does_not_repeat_is_not_chosen(tmp_path):
    """The winner is timed twice; the lower ratio counts: a fluke first block pair does not make the choice."""
    seq = iter([1.5, 0.95])
    calls = []

    def measure(c, dec, prompts, batch):
        calls.append(c.name)
        r = next(seq) if c.name == "ngram k2 G1" else 0.5
        return Measured(c, 100.0 * r, r, 2.0, 10.0)
    rep = tune(tiny_spec("llama", strategy={"kind": "ngram", "k": 3}), tmp_path / "t.yaml", progress=False,
               measure=measure, cost=lambda dec: FLAT)
    assert calls.count("ngram k2 G1") == 2 and rep.chosen.name == "autoregressive"
    assert "confirmation run: 0.95x" in (tmp_path / "t.yaml").read_text()


@pytest.mark.parametrize("by_batch,limit", [({2: 1.2, 4: 0.8}, 2), ({2: 0.9}, 1), ({2: 1.1, 4: 1.0, 8: 1.2}, 0)])
def test_batch_rows_set_draft_max_batch(by_batch, limit, tmp_path):
    """The chosen configuration is timed at batch 2, 4, 8: from the first batch where it is slower than
    autoregressive, calls fall back (strategy.draft_max_batch: the last batch that paid); larger batches are not
    timed after a loss. The written spec compiles with the nested autoregressive artifact."""
    name = "ngram k6 G1"
    rep, calls, written = run(tmp_path, {name: 1.6, **{(name, b): r for b, r in by_batch.items()}})
    assert [c for c in calls if isinstance(c, tuple)] == [(name, b) for b in by_batch]
    assert rep.chosen.name == name and rep.draft_max_batch == limit
    assert written["strategy"].get("draft_max_batch", 0) == limit
    text = (tmp_path / "tuned.yaml").read_text()
    assert "the chosen configuration by batch" in text and ("strategy.draft_max_batch" in text) == bool(limit)
    man = dgopt.load(dgopt.compile(load_spec(tmp_path / "tuned.yaml"), tmp_path / "art")).manifest
    assert man.get("fallback", {}).get("above_batch", 0) == limit


def test_a_spec_with_draft_max_batch_is_timed_without_its_fallback(tmp_path):
    """The spec's own draft_max_batch must not reach the candidates: compiled with it, a batch row would time the
    nested autoregressive step against autoregressive. The batch rows set the field anew (none when every batch
    paid); with no batch timed the spec's own value stands."""
    spec = tiny_spec("llama", strategy={"kind": "ngram", "k": 3, "draft_max_batch": 2})
    seen = []

    def measure(c, dec, prompts, batch):
        seen.append("fallback" in dec.manifest or "draft_max_batch" in c.strategy)
        r = 1.6 if c.name == "ngram k6 G1" else 0.5
        return Measured(c, 100.0 * r, r, 2.0, 10.0)
    for batches, want in (((2, 4, 8), None), ((), 2)):
        seen.clear()
        tune(spec, tmp_path / "t.yaml", progress=False, measure=measure, cost=lambda dec: FLAT, batches=batches)
        written = yaml.safe_load((tmp_path / "t.yaml").read_text())["strategy"]
        assert seen and not any(seen) and written.get("draft_max_batch") == want


def test_no_batch_rows_when_asked_for_none_or_autoregressive_wins(tmp_path):
    calls = []
    tune(tiny_spec("llama", strategy={"kind": "ngram", "k": 3}), tmp_path / "a.yaml", progress=False,
         measure=fake({"ngram k6 G1": 1.6}, calls), cost=lambda dec: FLAT, batches=())
    rep, calls2, _ = run(tmp_path, {})
    assert rep.chosen.name == "autoregressive" and not rep.batch_rows
    assert not [c for c in calls + calls2 if isinstance(c, tuple)]
    with pytest.raises(dgopt.DgoptError, match="--batches must be >= 2"):
        tune(tiny_spec("llama", strategy={"kind": "ngram"}), tmp_path / "b.yaml", progress=False, batches=(1,))


def test_cost_curve_skips_configs_that_cannot_win(tmp_path):
    steep = {q: float(q) for q in FLAT}                         # a step costs its positions: nothing can pay
    rep, calls, _ = run(tmp_path, {"ngram k3 G1": 2.0}, cost=steep)
    assert calls == [] and rep.chosen.name == "autoregressive"
    assert all(r.note.startswith("skipped") for r in rep.rows)


def test_candidates_per_kind():
    from dgopt.spec import spec_from_dict
    la = candidates(spec_from_dict(tiny_spec("llama", strategy={"kind": "lookahead", "window": 3, "ngram": 3,
                                                                "guesses": 3})))
    assert la[0].name == "lookahead W3 N3 G3" and la[0].positions == 1 + (3 + 3) * 2
    both = candidates(spec_from_dict(tiny_spec("llama", strategy={"kind": "jacobi"})), ["jacobi", "ngram"])
    assert {c.strategy["kind"] for c in both} == {"jacobi", "ngram"}


def test_cli_bad_input(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dgopt", "tune", *args], capture_output=True, text=True)
    r = cli(str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "t.yaml"))
    assert r.returncode == 2 and "spec file not found" in r.stderr
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(tiny_spec("llama", strategy={"kind": "ngram"})))
    r = cli(str(tmp_path / "s.yaml"), "-o", str(tmp_path / "t.yaml"), "--minutes", "0")
    assert r.returncode == 2 and "--minutes must be > 0" in r.stderr
    r = cli(str(tmp_path / "s.yaml"), "-o", str(tmp_path / "t.yaml"), "--kinds", "speculative")
    assert r.returncode == 2 and "needs the spec's draft model" in r.stderr
    assert not (tmp_path / "t.yaml").exists()
    for args, message in ((["--new-tokens", "0"], "--new-tokens must be >= 1"),
                          (["--prompts", str(tmp_path / "nope.txt")], "nope.txt: file not found")):
        r = cli(str(tmp_path / "s.yaml"), "-o", str(tmp_path / "t.yaml"), *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    (tmp_path / "adir").mkdir()
    r = cli(str(tmp_path / "s.yaml"), "-o", str(tmp_path / "adir"))
    assert r.returncode == 2 and "is a directory" in r.stderr and not (tmp_path / "adir.tmp").exists()


def test_removes_its_compiled_candidates(tmp_path, monkeypatch):
    """Every candidate is compiled into a temp dir (hundreds of MB for real models): gone when tune returns."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run(tmp_path, {"ngram k6 G1": 1.6})
    assert list((tmp_path / "tmp").iterdir()) == []


def test_without_matplotlib_the_spec_is_still_written(tmp_path, monkeypatch):
    """The plot is optional (matplotlib is not a core dependency, and the GPU image may lack it)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib -> ImportError
    rep, _, written = run(tmp_path, {"ngram k6 G1": 1.6})
    assert written["tuned"]["chosen"] == "ngram k6 G1" and not (tmp_path / "tuned.png").exists()
