"""Tests for dgopt's own small code models: corpus, tokenizers, trainer.

Everything trains on small deterministic slices of the corpus so the whole
file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from dgopt.models import corpus as C  # noqa: E402
from dgopt.models import tokenizers_train as TT  # noqa: E402
from dgopt.training import build as B  # noqa: E402
from dgopt.training import data as DA  # noqa: E402
from dgopt.training import distill as D  # noqa: E402
from dgopt.training import trainer as TR  # noqa: E402
from dgopt.training.recipes import RECIPES  # noqa: E402

SLICE = 150_000  # bytes of source used for tokenizer / model training in tests


# ---------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------


def test_corpus_files_deterministic_and_clean():
    a = C.corpus_files()
    b = C.corpus_files()
    assert [f.key for f in a] == [f.key for f in b]
    keys = [f.key for f in a]
    assert keys == sorted(keys)
    assert len(keys) == len(set(keys)) > 100
    for k in keys:
        assert k.endswith(".py")
        parts = k.split("/")[1:-1]
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), k
    assert "stdlib/os.py" in keys and "stdlib/asyncio/base_events.py" in keys


def test_split_disjoint_nonempty_stable():
    train, val = C.split_files()
    train2, val2 = C.split_files()
    tk, vk = [f.key for f in train], [f.key for f in val]
    assert tk == [f.key for f in train2] and vk == [f.key for f in val2]
    assert train and val
    assert not set(tk) & set(vk)
    assert sorted(tk + vk) == [f.key for f in C.corpus_files()]
    frac = len(vk) / (len(tk) + len(vk))
    assert 0.01 < frac < 0.08, frac
    # the split is a property of the file key alone
    assert all(C.is_validation(k) for k in vk) and not any(C.is_validation(k) for k in tk)


def test_split_limit_and_read_text():
    train, val = C.split_files(limit_bytes=SLICE)
    full_train, full_val = C.split_files()
    assert 0 < len(train) < len(full_train) and 0 < len(val) <= len(full_val)
    assert [f.key for f in train] == [f.key for f in full_train[: len(train)]]
    text = C.read_text(train[:2])
    assert text == C.read_file(train[0]) + C.FILE_SEPARATOR + C.read_file(train[1])
    assert C.fingerprint(train) == C.fingerprint(list(train))


# ---------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toks():
    files, _ = C.split_files(limit_bytes=SLICE)
    return {
        "code-bpe-4k": TT.train_tokenizer("code-bpe-4k", files=files, vocab_size=1024),
        "code-bpe-1k": TT.train_tokenizer("code-bpe-1k", files=files, vocab_size=384),
    }


def _random_texts(n=30, seed=1234):
    rng = random.Random(seed)
    alphabet = (
        "abcXYZ_019 \t\n\r\x00\x0b\x0c()[]{}:;.,'\"#\\@$%^&*-+=<>?/|~`"
        "éüßñøåçΩπλЖж日本語中文한국어🙂🐍\u200b\u00a0\ufeff"
    )
    out = [
        "",
        " ",
        "\n\n\t\t  \n",
        "def __init__(self, x):\n    self.x = x  # ünïcødé 🙂\r\n\treturn None\n",
        "    " * 10 + "pass",
        "<|endoftext|> is only text here",
    ]
    for _ in range(n):
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))))
    return out


def test_tokenizers_round_trip(toks, tmp_path):
    from transformers import AutoTokenizer

    for name, tok in toks.items():
        d = TT.save_tokenizer(tok, tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(str(d))
        assert loaded.eos_token_id == loaded.bos_token_id == loaded.pad_token_id == 0
        for t in (tok, loaded):
            for s in _random_texts():
                ids = t.encode(s, add_special_tokens=False)
                assert t.decode(ids) == s, (name, s)
        assert tok.encode("x = 1\n", add_special_tokens=False) == loaded.encode(
            "x = 1\n", add_special_tokens=False
        )


def test_tokenizers_differ_and_are_deterministic(toks):
    a, b = toks["code-bpe-4k"], toks["code-bpe-1k"]
    assert len(a) == 1024 and len(b) == 384
    src = "import os\n\ndef main(argv):\n    for arg in argv:\n        print(os.path.join(arg, 'x'))\n"
    ia, ib = a.encode(src, add_special_tokens=False), b.encode(src, add_special_tokens=False)
    assert ia != ib and len(ia) < len(ib)
    assert TT.tokenizer_fingerprint(a) != TT.tokenizer_fingerprint(b)
    files, _ = C.split_files(limit_bytes=SLICE)
    again = TT.train_tokenizer("code-bpe-1k", files=files, vocab_size=384)
    assert TT.tokenizer_fingerprint(again) == TT.tokenizer_fingerprint(b)


# ---------------------------------------------------------------------------
# recipes and locations
# ---------------------------------------------------------------------------


def _params(recipe):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(recipe.llama_config(TT.TOKENIZERS[recipe.tokenizer].vocab_size))
    return sum(p.numel() for p in m.parameters())


def test_recipes():
    assert {"code-tiny", "code-draft", "code-draft-xtok", "code-small"} <= set(RECIPES)
    n = {name: _params(r) for name, r in RECIPES.items()}
    for name, r in RECIPES.items():
        assert r.approx_params() == n[name], name
        assert r.max_position_embeddings >= 1024
        assert r.llama_config(128).tie_word_embeddings
    assert 2e6 <= n["code-tiny"] <= 6e6
    assert 5 <= n["code-tiny"] / n["code-draft"] <= 10
    assert n["code-draft-xtok"] < n["code-draft"]
    assert 20e6 <= n["code-small"] <= 30e6
    assert RECIPES["code-tiny"].tokenizer == RECIPES["code-draft"].tokenizer == "code-bpe-4k"
    assert RECIPES["code-draft-xtok"].tokenizer == "code-bpe-1k"
    assert RECIPES["code-small"].tokenizer == "code-bpe-4k"


def test_model_dir_and_list(tmp_path, monkeypatch):
    monkeypatch.setattr(TR, "ASSETS_DIR", tmp_path / "assets")
    monkeypatch.setenv("DGOPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="dgopt models build code-draft"):
        TR.model_dir("code-draft")
    d = tmp_path / "cache" / "models" / "code-draft"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    assert TR.model_dir("code-draft") == d
    a = tmp_path / "assets" / "code-draft"
    a.mkdir(parents=True)
    (a / "config.json").write_text("{}")
    (a / "model.safetensors").write_bytes(b"")
    assert TR.model_dir("code-draft") == a  # committed asset wins over cache
    rows = {r["name"]: r for r in TR.list_models()}
    assert set(RECIPES) <= set(rows)
    assert rows["code-draft"]["where"] == "asset"
    assert rows["code-tiny"]["where"] == "missing"
    assert all(r["params"] > 0 and r["description"] for r in rows.values())


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

MICRO = dict(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    seq_len=64,
    batch_size=8,
    long_seq_len=128,
    long_every=4,
    warmup_steps=4,
    eval_every=10,
    eval_tokens=4096,
    lr=1e-2,
    time_limit_s=None,
)


def test_training_lowers_loss_and_saves(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = dataclasses.replace(RECIPES["code-draft"], **MICRO)
    out = tmp_path / "micro"
    info = B.train_recipe(
        recipe, out, steps=20, limit_bytes=SLICE, vocab_size=512, progress=False, seed=0,
        threads=1,
    )
    losses = info["losses"]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    assert info["val_loss"] < 6.3  # ln(512) = 6.24 for a uniform guess

    build = json.loads((out / B.BUILD_INFO).read_text())
    for key in ("recipe", "seed", "steps", "command", "val_loss", "val_ppl", "unigram_ppl",
                "train_wall_s", "versions", "params", "tokenizer_fingerprint"):
        assert key in build, key
    assert build["versions"]["torch"] == torch.__version__
    assert build["unigram_ppl"] > 1

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings and model.config.max_position_embeddings >= 1024
    assert model.generation_config.eos_token_id == tok.eos_token_id == 0
    ids = tok("def __init__(self", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] >= ids.shape[1] + 1
    assert tok.decode(gen[0]).startswith("def __init__(self")

    # same seed, same slice -> same result
    info2 = B.train_recipe(
        recipe, tmp_path / "micro2", steps=20, limit_bytes=SLICE, vocab_size=512, progress=False,
        threads=1,
    )
    assert info2["losses"] == pytest.approx(losses, abs=1e-4)


def test_cli_build_and_list(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dgopt.cli import main as dgopt_main
    monkeypatch.setenv("DGOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "xtok"
    rc = dgopt_main(
        ["models", "build", "code-draft-xtok", "--out", str(out), "--steps", "3",
         "--corpus-limit", "60000", "--threads", "1", "--no-progress"]
    )
    assert rc == 0
    build = json.loads((out / B.BUILD_INFO).read_text())
    assert build["steps_done"] == 3 and build["tokenizer"] == "code-bpe-1k"
    assert "--corpus-limit 60000" in build["command"]
    assert len(AutoTokenizer.from_pretrained(str(out))) == 1024
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.vocab_size == 1024
    assert dgopt_main(["models", "list"]) == 0
    assert "code-tiny" in capsys.readouterr().out


def test_code_small_recipe_smoke(tmp_path):
    """code-small (GPU recipe, larger corpus) builds end to end; micro-sized here."""
    from transformers import AutoModelForCausalLM

    out = B.build_model(
        "code-small", out=tmp_path / "small", steps=2, limit_bytes=40_000, progress=False,
        overrides={**MICRO, "seq_len": 128, "eval_tokens": 1024}, threads=1,
    )
    build = json.loads((out / B.BUILD_INFO).read_text())
    assert build["corpus"]["corpus"] == "stdlib+deps" and build["steps_done"] == 2
    assert build["recipe"]["hidden_size"] == 32
    # a 40 KB slice has too few pairs for 4096 merges: the vocab is what the tokenizer reached, and they agree
    from transformers import AutoTokenizer
    vocab = AutoModelForCausalLM.from_pretrained(str(out)).config.vocab_size
    assert vocab == build["vocab_size"] == len(AutoTokenizer.from_pretrained(str(out))) <= 4096


def test_build_is_atomic(tmp_path, monkeypatch):
    """A build that fails leaves the previous model dir untouched and no staging dir; one that succeeds replaces it."""
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def broken(recipe, staging, **kw):
        (staging / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("interrupted")
    monkeypatch.setattr(B, "train_recipe", broken)
    with pytest.raises(RuntimeError):
        B.build_model("code-draft", out=out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and [p.name for p in out.iterdir()] == ["config.json"]
    monkeypatch.undo()
    B.build_model("code-draft", out=out, steps=2, limit_bytes=40_000, progress=False, threads=1,
                  overrides={**MICRO, "eval_tokens": 1024})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (out / B.BUILD_INFO).is_file()


def test_distillation_from_a_teacher(tmp_path):
    """recipe.teacher trains on KL(teacher || student): a student initialised from the teacher itself (init_from)
    starts at KL 0 and agreement 1; a fresh student's KL falls. A teacher with another tokenizer is refused."""
    recipe = dataclasses.replace(RECIPES["code-draft"], **MICRO)
    kw = dict(limit_bytes=SLICE, vocab_size=512, progress=False, threads=1)
    teacher = tmp_path / "teacher"
    B.train_recipe(recipe, teacher, steps=15, **kw)
    same = B.train_recipe(dataclasses.replace(recipe, teacher=str(teacher), init_from=str(teacher), lr=1e-9),
                          tmp_path / "same", steps=2, **kw)
    assert same["losses"][0] < 1e-5 and same["teacher_agreement"] == 1.0
    assert same["train_loss_kind"] == "kl_to_teacher"
    fresh = B.train_recipe(dataclasses.replace(recipe, teacher=str(teacher)), tmp_path / "fresh", steps=20, **kw)
    assert sum(fresh["losses"][-3:]) < sum(fresh["losses"][:3]) - 0.1, fresh["losses"]
    assert 0.0 <= fresh["teacher_agreement"] < 1.0
    with pytest.raises(ValueError, match="recipe.teacher"):
        B.train_recipe(dataclasses.replace(recipe, teacher=str(teacher)), tmp_path / "other", steps=1,
                       **{**kw, "vocab_size": 400})


def test_distillation_on_teacher_generations(tmp_path, monkeypatch):
    """recipe.teacher_generated: the teacher's greedy continuations are the batches of every generated_every-th
    step, and checkpoints are selected by agreement on held-out ones. A student that is the teacher agrees fully
    and has KL 0 on them; the batches really are greedy continuations; no teacher is a one-line error."""
    import torch
    recipe = dataclasses.replace(RECIPES["code-draft"], **MICRO)
    kw = dict(limit_bytes=SLICE, vocab_size=512, progress=False, threads=1)
    teacher = tmp_path / "teacher"
    B.train_recipe(recipe, teacher, steps=15, **kw)
    monkeypatch.setattr(D, "GEN_HELD_OUT", 16)
    seen = []
    orig = D.teacher_generations
    monkeypatch.setattr(D, "teacher_generations", lambda *a: seen.append(orig(*a)) or seen[-1])
    same = B.train_recipe(dataclasses.replace(recipe, teacher=str(teacher), init_from=str(teacher), lr=1e-9,
                                              teacher_generated=8, generated_every=1), tmp_path / "same", steps=2, **kw)
    assert same["evals_metric"] == "teacher_disagreement_on_generations"
    assert same["teacher_generated_agreement"] == 1.0 and same["evals"][-1][1] == 0.0
    assert max(same["losses"]) < 1e-5
    (rows,) = seen
    assert rows.shape == (8 + 16, D.GEN_PROMPT + D.GEN_NEW)
    from transformers import LlamaForCausalLM
    tm = LlamaForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    with torch.no_grad():           # each row continues its prompt greedily: argmax at every generated position
        nxt = tm(input_ids=rows[:4]).logits.argmax(-1)
    assert torch.equal(nxt[:, D.GEN_PROMPT - 1:-1], rows[:4, D.GEN_PROMPT:])
    hard = B.train_recipe(dataclasses.replace(recipe, teacher=str(teacher), init_from=str(teacher), lr=1e-9,
                                              teacher_generated=8, generated_every=1, hard_labels=True),
                          tmp_path / "hard", steps=2, **kw)
    # hard labels: cross-entropy on the greedy tokens, which the teacher itself does not reach 0 on (KL would)
    assert hard["train_loss_kind"] == "cross_entropy" and min(hard["losses"]) > 1e-3
    assert hard["teacher_generated_agreement"] == 1.0
    r2 = dataclasses.replace(recipe, generated_every=2, long_every=4)
    stream = torch.arange(5000) % 400
    batches = [DA.recipe_batch(i, r2, stream, rows, torch.Generator().manual_seed(0)) for i in range(4)]
    n = r2.batch_size * r2.seq_len                  # tokens per batch, whatever the rows
    assert [tuple(b.shape) for b in batches] == [(n // rows.shape[1], rows.shape[1]), (n // r2.seq_len, r2.seq_len),
                                                 (n // rows.shape[1], rows.shape[1]),
                                                 (n // r2.long_seq_len, r2.long_seq_len)]
    assert all((b[:, None] == rows[None]).all(-1).any(1).all() for b in batches[::2])   # rows of the generations
    with pytest.raises(ValueError, match="recipe.teacher_generated needs recipe.teacher"):
        B.train_recipe(dataclasses.replace(recipe, teacher_generated=4), tmp_path / "none", steps=1, **kw)


def test_distillation_across_tokenizers_on_generated_text(tmp_path, monkeypatch):
    """A teacher with another tokenizer (a UAG draft's target) gives only its text: each training row is the
    student's encoding of a corpus window's text followed by the teacher's greedy continuation of it, the loss is
    cross-entropy, checkpoints are selected on held-out generations. Without teacher_generated: a one-line error."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    recipe = dataclasses.replace(RECIPES["code-draft"], **MICRO)
    teacher = tmp_path / "teacher"
    B.train_recipe(recipe, teacher, steps=15, limit_bytes=SLICE, vocab_size=512, progress=False, threads=1)
    monkeypatch.setattr(D, "GEN_HELD_OUT", 8)
    seen = []
    orig = D.teacher_generations
    monkeypatch.setattr(D, "teacher_generations", lambda *a: seen.append((orig(*a), a[-1])) or seen[-1][0])
    kw = dict(limit_bytes=SLICE, vocab_size=400, progress=False, threads=1)
    info = B.train_recipe(dataclasses.replace(recipe, teacher=str(teacher), teacher_generated=8),
                          tmp_path / "x", steps=3, **kw)
    assert info["train_loss_kind"] == "cross_entropy" and info["evals_metric"] == "cross_entropy_on_generations"
    assert info["teacher_agreement"] is None and info["teacher_generated_loss"] > 0
    (rows, (stok, ttok)), = seen
    assert rows.shape == (16, D.GEN_PROMPT + D.GEN_NEW) and len(stok) == 400 and len(ttok) == 512
    tm = LlamaForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    for row in rows[:3]:        # the text is the teacher's: its greedy continuation of its encoding of the start
        text = stok.decode(row.tolist())
        t_ids = ttok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            nxt = tm(input_ids=torch.tensor([t_ids])).logits[0].argmax(-1)
        agree = (nxt[:-1] == torch.tensor(t_ids[1:])).float()
        assert agree[len(t_ids) // 3:].mean() > 0.9, agree        # past the prompt, barring the re-encoded seams
    assert AutoTokenizer.from_pretrained(str(tmp_path / "x")).vocab_size == 400
    with pytest.raises(ValueError, match=r"recipe.teacher: .* another tokenizer .*\(recipe.teacher_generated\)"):
        B.train_recipe(dataclasses.replace(recipe, teacher=str(teacher)), tmp_path / "y", steps=1, **kw)


def test_distillation_from_a_teacher_with_finer_tokens_stops_with_a_reason(tmp_path):
    """A student whose tokens are much longer than its teacher's gets few rows of full length from the teacher's
    text: the generation loop stops with a one-line reason instead of drawing forever."""
    recipe = dataclasses.replace(RECIPES["code-draft"], **MICRO)
    B.train_recipe(recipe, tmp_path / "t", steps=3, limit_bytes=SLICE, vocab_size=300, progress=False, threads=1)
    with pytest.raises(ValueError, match=r"recipe.teacher_generated: only \d+ of \d+ continuations"):
        B.train_recipe(dataclasses.replace(recipe, teacher=str(tmp_path / "t"), teacher_generated=8),
                       tmp_path / "x", steps=1, limit_bytes=SLICE, vocab_size=2000, progress=False, threads=1)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------
# shipped tokenizers (issue 24 item 11): builds must not depend on the running Python's stdlib
# ---------------------------------------------------------------------------


def test_shipped_tokenizers_are_the_shipped_models_and_need_no_stdlib(tmp_path, monkeypatch):
    """Each shipped model's tokenizer is a shipped tokenizer asset, and a build gets it without reading a stdlib."""
    from transformers import AutoTokenizer
    monkeypatch.setattr(C, "stdlib_root", lambda: tmp_path / "no-stdlib")
    for name in ("code-tiny", "code-draft", "code-draft-kd", "code-draft-sd", "code-draft-xtok", "code-draft-xtok-sd"):
        d = TR.model_dir(name)
        card = json.loads((d / B.BUILD_INFO).read_text())
        tok, src = TT.recipe_tokenizer(card["tokenizer"], files=[])
        assert src["source"] == "asset" and src["corpus_python"] == card["corpus"]["python"] == card["corpus_python"]
        assert TT.tokenizer_fingerprint(tok) == card["tokenizer_fingerprint"] == TT.asset_info(card["tokenizer"])[
            "fingerprint"]
        shipped = AutoTokenizer.from_pretrained(str(d))
        for s in _random_texts(5):
            assert tok.encode(s, add_special_tokens=False) == shipped.encode(s, add_special_tokens=False)


def test_build_on_another_stdlib_keeps_the_shipped_tokenizer_and_states_pythons(tmp_path, monkeypatch):
    """A build whose stdlib is another (as on another Python) still has the shipped tokenizer's ids; its card says
    which Python's stdlib the model and the tokenizer were trained on."""
    import platform
    other = tmp_path / "stdlib"
    other.mkdir()
    for i in range(40):
        (other / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i}\n" * 30)
    monkeypatch.setattr(C, "stdlib_root", lambda: other)
    recipe = dataclasses.replace(RECIPES["code-draft"], **{**MICRO, "eval_tokens": 1024})
    info = B.train_recipe(recipe, tmp_path / "m", steps=1, progress=False, threads=1)
    asset = TT.asset_info("code-bpe-4k")
    assert info["tokenizer_fingerprint"] == asset["fingerprint"] and info["vocab_size"] == 4096
    assert info["tokenizer_source"] == {"source": "asset", "path": "dgopt/assets/tokenizers/code-bpe-4k",
                                        "corpus_python": asset["corpus_python"]}
    assert info["corpus_python"] == info["corpus"]["python"] == platform.python_version()
    assert info["corpus"]["stdlib"] == str(other)
    # with a vocab_size override (tests) the tokenizer is trained here, and the card says so
    trained = B.train_recipe(recipe, tmp_path / "t", steps=1, vocab_size=300, progress=False, threads=1)
    assert trained["tokenizer_source"] == {"source": "trained", "corpus_python": platform.python_version()}


def _retrained_copy(src, dst, python="3.12.1"):
    """A copy of a built model whose card records a tokenizer of the same name and vocabulary retrained on another
    Python (other merges: another fingerprint)."""
    import shutil
    shutil.copytree(src, dst)
    card = json.loads((dst / B.BUILD_INFO).read_text())
    card.update(tokenizer_fingerprint="0123456789abcdef", corpus_python=python)
    card["corpus"]["python"] = python
    card.pop("tokenizer_source", None)
    (dst / B.BUILD_INFO).write_text(json.dumps(card))
    return dst


def test_build_refuses_a_teacher_or_partner_whose_tokenizer_has_other_ids(tmp_path, monkeypatch, capsys):
    teacher = _retrained_copy(TR.model_dir("code-tiny"), tmp_path / "tiny-312")
    recipe = dataclasses.replace(RECIPES["code-draft"], **MICRO)
    kw = dict(steps=1, limit_bytes=40_000, progress=False, threads=1)
    # before: the same-named tokenizer with other ids silently took the cross-tokenizer (text) path
    msg = (rf"recipe.teacher: {teacher}'s tokenizer code-bpe-4k \(0123456789abcdef, corpus Python 3.12.1\) differs "
           r"from code-draft's code-bpe-4k \(07da39490362094b, corpus Python 3.11.7\)")
    with pytest.raises(ValueError, match=msg):
        B.train_recipe(dataclasses.replace(recipe, teacher=str(teacher), teacher_generated=8), tmp_path / "a", **kw)
    with pytest.raises(ValueError, match=r"recipe.init_from: .*differs from code-draft's"):
        B.train_recipe(dataclasses.replace(recipe, init_from=str(teacher)), tmp_path / "b", **kw)
    with pytest.raises(ValueError, match=r"recipe.pairs_with: .*tiny-312's tokenizer code-bpe-4k .* differs from"):
        B.train_recipe(dataclasses.replace(recipe, pairs_with=(str(teacher),)), tmp_path / "c", **kw)
    # a draft with its target through the CLI: code-draft's target code-tiny (here the copy) is built: refused
    from dgopt.cli import main as dgopt_main
    monkeypatch.setattr(TR, "ASSETS_DIR", tmp_path / "assets")
    monkeypatch.setenv("DGOPT_CACHE", str(tmp_path / "cache"))
    _retrained_copy(teacher, tmp_path / "cache" / "models" / "code-tiny")
    rc = dgopt_main(["models", "build", "code-draft", "--steps", "1", "--corpus-limit", "40000", "--no-progress",
                     "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "recipe.pairs_with:" in err and "code-tiny's tokenizer" in err
    assert "differs from code-draft's code-bpe-4k" in err and not (tmp_path / "cache" / "models" / "code-draft").exists()
