"""Speculative decoding (greedy): token-identical to target-only transformers generate for drafts that agree
always, never, or partly (rows accepting different counts in one batch), and for drafts whose vocabulary is
larger or smaller than the target's."""
import pytest

import dgopt
from conftest import PROMPTS, TINY, hf_greedy, hf_model, noisy_draft_dir, tiny_spec

NEW = 48


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")
    return {
        "noisy": noisy_draft_dir(root, "noisy", 0.002),
        "same": {"config": dict(TINY["llama"]), "seed": 0},
        "weak": {"config": {**TINY["llama"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 1}, "seed": 3},
        "bigger-vocab": {"config": {**TINY["llama"], "vocab_size": 400, "num_hidden_layers": 1}, "seed": 1},
        "smaller-vocab": {"config": {**TINY["gpt2"], "vocab_size": 200}, "seed": 2},
    }


@pytest.fixture(scope="module")
def refs():
    m = hf_model("llama")
    return [hf_greedy(m, p, NEW) for p in PROMPTS]


def compile_pair(tmp_path, draft, k=3, opt_level=2):
    spec = tiny_spec("llama", strategy={"kind": "speculative", "k": k})
    spec["draft"] = draft
    return dgopt.load(dgopt.compile(spec, tmp_path / f"spec-{k}-{opt_level}", opt_level=opt_level))


@pytest.mark.parametrize("name", ["noisy", "same", "weak", "bigger-vocab", "smaller-vocab"])
def test_greedy_exact_batch1_and_batch4(name, drafts, refs, tmp_path):
    dec = compile_pair(tmp_path, drafts[name])
    for p, ref in zip(PROMPTS, refs):
        assert dec.generate(p, max_new_tokens=NEW).ids[0] == ref
    res = dec.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert res.ids == refs[:4]
    rate = res.stats["acceptance_rate"]
    if name == "same":
        assert rate == 1.0 and res.stats["tokens_per_step"] == 4.0
    if name == "noisy":
        assert 0.05 < rate < 1.0 and len(res.stats["accepted_hist"]) > 2     # rows accept different counts


@pytest.mark.parametrize("k", [1, 5])
def test_k_values_and_O0_equals_O2(k, drafts, refs, tmp_path):
    d0 = compile_pair(tmp_path, drafts["noisy"], k, 0)
    d2 = compile_pair(tmp_path, drafts["noisy"], k, 2)
    r0, r2 = d0.generate(PROMPTS[:4], max_new_tokens=NEW), d2.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert r0.ids == r2.ids == refs[:4] and r0.stats["steps"] == r2.stats["steps"]


def test_repeated_calls_identical(drafts, tmp_path):
    dec = compile_pair(tmp_path, drafts["noisy"])
    a, b = dec.generate(PROMPTS[:3], max_new_tokens=NEW), dec.generate(PROMPTS[:3], max_new_tokens=NEW)
    assert a.ids == b.ids and a.stats["steps"] == b.stats["steps"]
    assert {"draft_s", "target_s", "acceptance_rate"} <= set(a.stats)


def test_artifact_holds_both_step_graphs(drafts, tmp_path):
    dec = compile_pair(tmp_path, drafts["weak"])
    assert (dec.path / "draft.onnx").is_file() and "draft.onnx" in dec.manifest["files"]
    assert dec.manifest["draft"]["model"]["num_layers"] == 1


def test_missing_draft_is_a_spec_error(tmp_path):
    from dgopt.errors import SpecError
    from dgopt.spec import spec_from_dict
    with pytest.raises(SpecError, match="'draft'"):
        spec_from_dict(tiny_spec(strategy={"kind": "speculative"}))
