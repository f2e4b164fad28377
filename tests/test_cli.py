"""CLI end to end in a temp dir, and bad input: one-line error, exit code 2, nothing half-written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dgopt.cli import main
from conftest import TINY, tiny_spec


def write_spec(tmp_path, data, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_run_inspect_end_to_end(tmp_path, capsys):
    spec = write_spec(tmp_path, tiny_spec("llama"))
    art = tmp_path / "art"
    code, out, err = run_cli(capsys, "compile", spec, "-o", art, "--dump-passes", tmp_path / "dump", "--verify-each")
    assert code == 0 and out.strip() == str(art.resolve())
    assert {p.name for p in art.iterdir()} == {"manifest.json", "step.onnx", "ir.yaml", "ir.O0.yaml"}
    code, out, _ = run_cli(capsys, "run", art, "--ids", "1,2,3", "--max-new-tokens", "8", "--json")
    res = json.loads(out)
    assert code == 0 and len(res["ids"]) == 8 and res["stats"]["steps"] == 8 and res["text"] is None
    code, out, _ = run_cli(capsys, "run", art, "--ids", "1,2,3;4,5", "--max-new-tokens", "4")
    assert code == 0 and len(out.strip().splitlines()) == 2
    code, out, _ = run_cli(capsys, "inspect", art, "--no-browser")
    assert code == 0 and str((art / "step.onnx").resolve()) in out
    # every dump is a valid spec that compiles again, to the same IR
    dumps = sorted((tmp_path / "dump").glob("*.yaml"))
    assert [d.name.split("-", 1)[1] for d in dumps] == ["input.yaml", "eliminate_softmax_before_argmax.yaml",
                                                        "eliminate_dead_nodes.yaml"]    # only passes that changed
    code, out, _ = run_cli(capsys, "compile", dumps[-1], "-o", tmp_path / "again", "-O0", "-q")
    assert code == 0
    fp = lambda p: json.loads((p / "manifest.json").read_text())["pipeline"]["ir_fingerprint"]
    assert fp(tmp_path / "again") == fp(art)


def test_set_overrides_and_relative_model_path(tmp_path, capsys):
    from dgopt.models.hf import config_model
    model_dir = tmp_path / "models" / "m"
    config_model(dict(TINY["qwen2"]), 0).save_pretrained(model_dir)
    sub = tmp_path / "specs"
    sub.mkdir()
    spec = write_spec(sub, {"model": {"path": "../models/m"}, "target": {"max_seq_len": 128}})
    code, out, _ = run_cli(capsys, "compile", spec, "-o", tmp_path / "a", "--set", "sampling.kind=sample",
                           "--set", "sampling.top_k=5", "-q")
    assert code == 0
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["sampling"]["kind"] == "sample" and m["sampling"]["top_k"] == 5 and m["model"]["family"] == "qwen2"


BAD_SPECS = {
    "not yaml": ("model: [unclosed", "invalid YAML"),
    "empty": ("", "empty"),
    "top level list": ("- 1\n- 2\n", "top level must be a mapping"),
    "no model": ({"sampling": {"kind": "greedy"}}, "'model'"),
    "two model sources": ({"model": {"path": "x", "config": {"family": "llama"}}}, "exactly one of"),
    "unknown family": ({"model": {"config": {"family": "mamba"}}}, "model.config.family"),
    "unknown key": ({**tiny_spec(), "samplng": {}}, "samplng"),
    "bad top_p": (tiny_spec(sampling={"top_p": 1.5}), "sampling.top_p"),
    "negative temperature": (tiny_spec(sampling={"temperature": -1}), "sampling.temperature"),
    "bad strategy": (tiny_spec(strategy={"kind": "beam"}), "strategy.kind"),
    "bad backend": (tiny_spec(target={"backend": "tvm"}), "target.backend"),
    "bad max_batch": (tiny_spec(target={"max_batch": 0}), "target.max_batch"),
    "fp16 on cpu": (tiny_spec(target={"precision": "fp16"}), "target.precision"),
    "in-graph noise with lookahead": (tiny_spec(strategy={"kind": "lookahead"},
                                                sampling={"kind": "sample", "noise": "in_graph"}), "sampling.noise"),
    "zero penalty": (tiny_spec(sampling={"repetition_penalty": 0}), "sampling.repetition_penalty"),
    "unfused uag": (tiny_spec(strategy={"kind": "uag", "fused": False}), "strategy"),
    "seq len over model": (tiny_spec(target={"max_seq_len": 4096}), "target.max_seq_len"),
    "bad graph op": ({**tiny_spec(), "graph": {"nodes": [{"id": "a", "op": "softermax"}], "outputs": {"o": "a"}}},
                     "unknown op"),
    "bad model config": ({"model": {"config": {"family": "llama", "hidden_size": "big"}}}, "model.config"),
    "bad forward": (tiny_spec(target={"forward": "onnxscript"}), "target.forward"),
    "direct gpt2 forward": (tiny_spec("gpt2", target={"forward": "direct"}), "target.forward: direct cannot write"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_one_line_error_no_artifact(case, tmp_path, capsys):
    data, needle = BAD_SPECS[case]
    spec = write_spec(tmp_path, data)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "compile", spec, "-o", out_dir)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not out_dir.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["spec.yaml"]          # no staging dir left behind


def test_missing_model_dir(tmp_path, capsys):
    spec = write_spec(tmp_path, {"model": {"path": "nowhere"}})
    code, _, err = run_cli(capsys, "compile", spec, "-o", tmp_path / "out")
    assert code == 2 and "model.path: model directory not found" in err and not (tmp_path / "out").exists()


def test_missing_spec_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "compile", tmp_path / "nope.yaml")
    assert code == 2 and err.startswith("error: spec file not found")


@pytest.fixture
def artifact(tmp_path, artifacts):
    import shutil
    dst = tmp_path / "art"
    shutil.copytree(artifacts("llama"), dst)
    return dst


def _rename_kv_output(a, new: str):
    m = json.loads((a / "manifest.json").read_text())
    next(o for o in m["io"]["outputs"] if o["type"] == "kv")["name"] = new
    (a / "manifest.json").write_text(json.dumps(m))


def _edit_model(a, **kw):
    m = json.loads((a / "manifest.json").read_text())
    m["model"].update(kw)
    (a / "manifest.json").write_text(json.dumps(m))


def _edit_strategy(a, **kw):
    m = json.loads((a / "manifest.json").read_text())
    m["strategy"].update(kw)
    (a / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, needle", [
    (lambda a: (a / "manifest.json").write_text("{not json"), "corrupt manifest.json"),
    (lambda a: (a / "manifest.json").write_text(json.dumps({"schema_version": "1.0"})), "missing key"),
    (lambda a: (a / "manifest.json").write_text(json.dumps(
        {**json.loads((a / "manifest.json").read_text()), "schema_version": "9.0"})), "schema_version 9.0"),
    (lambda a: (a / "step.onnx").write_bytes((a / "step.onnx").read_bytes()[:-10] + b"0123456789"), "sha256"),
    (lambda a: (a / "step.onnx").unlink(), "artifact file missing: step.onnx"),
    (lambda a: (a / "manifest.json").unlink(), "not a dgopt artifact"),
    (lambda a: _edit_model(a, kv_dtype="float16"), "model.kv_dtype 'float16' does not match"),
    (lambda a: _edit_model(a, kv_dtype="int8"), "model.kv_dtype 'int8'"),
    (lambda a: _rename_kv_output(a, "draft_present"), "do not pair with its kv inputs"),
    (lambda a: _edit_strategy(a, k_schedule="heuristic"), "k_schedule 'heuristic' and confidence 0.0 but the "
                                                           "step graphs take no"),
    (lambda a: _edit_strategy(a, confidence=0.4), "confidence 0.4 but the step graphs take no draft_k"),
])
def test_damaged_artifact_one_line_error(artifact, damage, needle, capsys):
    damage(artifact)
    code, _, err = run_cli(capsys, "run", artifact, "--ids", "1,2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_run_bad_arguments(artifact, capsys):
    assert run_cli(capsys, "run", artifact, "--ids", "1,x")[0] == 2
    code, _, err = run_cli(capsys, "run", artifact, "--ids", "99999")
    assert code == 2 and "outside the vocabulary" in err
    code, _, err = run_cli(capsys, "run", artifact, "--prompt", "hello")
    assert code == 2 and "no tokenizer" in err
    code, _, err = run_cli(capsys, "run", artifact.parent / "nothing", "--ids", "1")
    assert code == 2 and "artifact not found" in err


@pytest.mark.parametrize("argv, line", [
    (["--ids", "1,2", "--max-new-tokens", "0"], "error: --max-new-tokens 0: must be at least 1"),
    (["--ids", "1,2", "--max-new-tokens", "-1"], "error: --max-new-tokens -1: must be at least 1"),
    (["--ids", ""], "error: --ids '': empty prompt (give at least one token id per row: 1,2,3)"),
    (["--ids", " ; "], "error: --ids ' ; ': empty prompt (give at least one token id per row: 1,2,3)"),
    (["--ids", "1,2;,"], "error: --ids '1,2;,': empty prompt (give at least one token id per row: 1,2,3)"),
])
def test_run_bad_count_or_empty_prompt(artifact, argv, line, capsys):
    code, out, err = run_cli(capsys, "run", artifact, *argv)
    assert code == 2 and out == "" and err.strip().splitlines() == [line]


def test_console_script_exit_code(tmp_path):
    """The real entry point (new process): exit 2 and a single stderr line."""
    spec = write_spec(tmp_path, tiny_spec(sampling={"top_k": -3}))
    p = subprocess.run([sys.executable, "-m", "dgopt", "compile", str(spec)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: spec field 'sampling.top_k': Input should be greater than or equal to 0"]


def test_failed_compile_keeps_previous_artifact(tmp_path, capsys):
    spec = write_spec(tmp_path, tiny_spec())
    art = tmp_path / "art"
    assert run_cli(capsys, "compile", spec, "-o", art, "-q")[0] == 0
    before = (art / "manifest.json").read_text()
    bad = write_spec(tmp_path, {"model": {"path": "nowhere"}}, "bad.yaml")
    assert run_cli(capsys, "compile", bad, "-o", art)[0] == 2
    assert (art / "manifest.json").read_text() == before


@pytest.mark.parametrize("spec", sorted(p.name for p in (__import__("pathlib").Path(__file__).parents[1] / "specs")
                                        .glob("*.yaml")))
def test_every_shipped_spec_passes_tensorrt_check(spec, capsys):
    path = __import__("pathlib").Path(__file__).parents[1] / "specs" / spec
    code, out, _ = run_cli(capsys, "check", path, "--target", "tensorrt")
    assert code == 0 and "0 errors" in out, out


def test_check_fails_on_unbuildable_spec(tmp_path, capsys):
    spec = write_spec(tmp_path, tiny_spec(sampling={"kind": "sample", "top_p": 0.9},
                                          model={"config": {**TINY["llama"], "vocab_size": 5000}}))
    code, out, _ = run_cli(capsys, "check", spec, "--precision", "fp16")
    assert code == 1 and "sampler/top_p/TopK" in out and "3840" in out


def test_check_at_fp16_lowers_the_fp16_graph(tmp_path, capsys):
    """TensorRT builds strongly typed, so `check --precision fp16` checks the fp16 step graph a build would use:
    no "this graph is fp32" warning, no unclamped-mask warning."""
    spec = write_spec(tmp_path, tiny_spec())
    code, out, _ = run_cli(capsys, "check", spec, "--precision", "fp16")
    assert code == 0 and "0 errors, 0 warnings" in out, out


def test_compile_tensorrt_without_tensorrt_is_one_line_error(tmp_path, capsys):
    spec = write_spec(tmp_path, tiny_spec(target={"backend": "tensorrt", "device": "cuda"}))
    code, _, err = run_cli(capsys, "compile", spec, "-o", tmp_path / "out")
    assert code == 2 and "TensorRT not installed" in err and not (tmp_path / "out").exists()


def test_models_list_and_unknown_model(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "models", "list")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"code-tiny", "code-draft", "code-draft-kd", "code-draft-sd", "code-draft-xtok",
                         "code-draft-xtok-sd", "code-small"}
    assert "assets/models/code-tiny" in rows["code-tiny"] and "27.3" in rows["code-tiny"]
    code, _, err = run_cli(capsys, "models", "build", "no-such-model")
    assert code == 2 and err.count("\n") == 1 and "unknown model 'no-such-model'" in err
    code, _, err = run_cli(capsys, "compile", Path(__file__).parents[1] / "specs" / "greedy.yaml",
                           "--set", "model.name=no-such-model", "-o", tmp_path / "x")
    assert code == 2 and "model.name" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("port", ["0", "-5", "99999"])
def test_serve_port_out_of_range_is_one_line(port, capsys):
    """uvicorn would wrap 99999 to another port, and -5 failed after the model loaded, naming no option."""
    assert main(["serve", "no-artifact", "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: must be 1..65535" in err and err.count("\n") == 1
