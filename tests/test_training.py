"""The shared trainer (dgopt.training.trainer.train) and the `dgopt train` group, on tiny models: seconds."""
import json
import shutil

import pytest
import torch

from dgopt.cli import main
from dgopt.training.trainer import BUILD_INFO, model_dir, train


def _regression(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 4, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return X, y


def _run(model, X, y, validate=None, **kw):
    rows = torch.Generator().manual_seed(1)
    return train(model, lambda step: torch.randint(0, len(X), (32,), generator=rows),
                 lambda m, i: ((m(X[i]).squeeze(-1) - y[i]) ** 2).mean(),
                 validate or (lambda m: float(((m(X).squeeze(-1) - y) ** 2).mean().detach())),
                 progress=False, **kw)


def test_train_lowers_loss_keeps_the_best_state_and_is_deterministic():
    X, y = _regression()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    res = _run(model, X, y, max_steps=60, lr=0.1, eval_every=10, seed=0, weight_decay=0.0)
    assert res.steps_done == 60 and res.stopped == "steps" and len(res.evals) == 6
    assert res.evals[-1][1] < res.evals[0][1] / 10
    assert res.best_val == min(v for _, v in res.evals) and res.best_step in [s for s, _ in res.evals]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in res.best_state.items())   # best state loaded
    torch.manual_seed(0)
    again = _run(torch.nn.Linear(4, 1), X, y, max_steps=60, lr=0.1, eval_every=10, seed=0, weight_decay=0.0)
    assert again.losses == res.losses


def test_train_stops_early_without_improvement_and_on_its_time_budget():
    X, y = _regression()
    vals = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9])       # improves once, then gets worse
    res = _run(torch.nn.Linear(4, 1), X, y, validate=lambda m: next(vals), max_steps=100, lr=0.01, eval_every=5,
               patience=2)
    assert res.stopped == "early stop at step 20 (no val improvement in 2 evals)" and res.best_step == 10
    res = _run(torch.nn.Linear(4, 1), X, y, max_steps=10**6, lr=0.01, eval_every=10**6, minutes=0.5 / 60)
    assert res.stopped.startswith("time budget 0s reached after") and res.time_adjusted
    assert 0 < res.steps_done < 10**6 and res.evals[-1][0] == res.steps_done


def test_train_param_groups_with_lr_scale_and_frozen_parts():
    """A frozen body (a recycle-style target) stays as it is; a group's lr_scale scales the scheduled rate."""
    X, y = _regression()
    body, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    body.requires_grad_(False)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    model = torch.nn.Sequential(body, head)
    frozen = _run(model, X, y, max_steps=5, lr=0.1, eval_every=5,
                  groups=[{"params": list(head.parameters()), "lr_scale": 0.0}])
    assert all(torch.equal(body.state_dict()[k], v) for k, v in before.items())
    assert frozen.losses[0] == pytest.approx(frozen.losses[-1], rel=0.5) and len(frozen.evals) == 1


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random Llama with the shipped 4k tokenizer, saved as a model dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("lm") / "m"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=256)).save_pretrained(d)
    AutoTokenizer.from_pretrained(str(model_dir("code-draft"))).save_pretrained(str(d))
    return d


def test_train_lm_fine_tunes_on_files(tmp_path, capsys, tiny_lm):
    data = tmp_path / "text"
    data.mkdir()
    for i in range(30):
        (data / f"f{i}.py").write_text("def add(a, b):\n    return a + b\n\n" * 20 + f"x = {i}\n")
    (data / "weights.bin").write_bytes(b"\0\1\2" * 100)         # binaries and hidden dirs are not text to learn
    (data / ".git").mkdir()
    (data / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    out = tmp_path / "out"
    code = main(["train", "lm", str(tiny_lm), "-o", str(out), "--data", str(data), "--max-steps", "12",
                 "--lr", "3e-3", "--seq-len", "32", "--batch-size", "4", "--eval-every", "4", "--threads", "1",
                 "--no-progress"])
    assert code == 0 and capsys.readouterr().out.strip().endswith(str(out))
    card = json.loads((out / BUILD_INFO).read_text())
    assert card["kind"] == "train lm" and card["steps_done"] == 12 and card["data"] == [str(data)]
    assert card["val_loss"] < card["val_loss_before"] - 0.5 and card["train_files"] + card["val_files"] == 30
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert "dgopt train lm" in card["command"] and "--max-steps=12" in card["command"]


def test_train_lm_on_its_own_generations(tmp_path, capsys, tiny_lm):
    out = tmp_path / "self"
    code = main(["train", "lm", str(tiny_lm), "-o", str(out), "--data", "self", "--generations", "4",
                 "--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--threads", "1", "--no-progress"])
    assert code == 0 and json.loads((out / BUILD_INFO).read_text())["steps_done"] == 3


@pytest.mark.parametrize("argv, message", [
    (["NOPE", "-o", "{t}/o"], "MODEL_DIR NOPE: not a model directory"),
    (["{m}", "-o", "{t}/o", "--data", "{t}/missing"], "--data {t}/missing: no such file or directory"),
    (["{m}", "-o", "{m}"], "contains MODEL_DIR"),
    (["{m}", "-o", "{t}/o", "--minutes", "0"], "--minutes must be a finite number > 0"),
    (["{m}", "-o", "{t}/o", "--minutes", "nan"], "--minutes must be a finite number > 0"),
    (["{m}", "-o", "{t}/o", "--seq-len", "0"], "--seq-len must be >= 1"),
])
def test_train_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, tiny_lm, argv, message):
    fill = lambda s: s.format(t=tmp_path, m=tiny_lm)    # noqa: E731
    code = main(["train", "lm", *map(fill, argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fill(message) in err
    assert not (tmp_path / "o").exists()


def test_train_refuses_an_output_it_would_destroy_before_training(tmp_path, capsys, tiny_lm):
    """-o is replaced as a whole when training ends: a directory holding something else, a path under a file, and
    a directory containing MODEL_DIR are refused at once, and nothing is touched."""
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "precious.txt").write_text("keep me")
    (tmp_path / "file").write_text("x")
    inner = tmp_path / "models" / "m"
    shutil.copytree(tiny_lm, inner)
    for out, model, message in ((home, tiny_lm, "holds no model"), (tmp_path / "file" / "sub", tiny_lm,
                                "cannot create it"), (tmp_path / "models", inner, "contains MODEL_DIR")):
        code = main(["train", "lm", str(model), "-o", str(out), "--max-steps", "3", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert (home / "docs" / "precious.txt").read_text() == "keep me" and (inner / "config.json").is_file()


def test_train_lm_without_tokenizer_is_one_line(tmp_path, capsys, tiny_lm):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_lm, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    code = main(["train", "lm", str(bare), "-o", str(tmp_path / "o")])
    assert code == 2 and "has no tokenizer files" in capsys.readouterr().err
