"""Position limits and spec defaults: target.max_seq_len left out fits the model (and a speculative draft); an explicit
value above either is a one-line error naming both; dtype fields take transformers' names and record one spelling."""
import pytest
import yaml

import dgopt
from conftest import PROMPTS, TINY, hf_greedy, hf_model, tiny_spec
from dgopt.errors import DgoptError
from dgopt.spec import spec_from_dict
from test_uag import pair  # noqa: F401 - the uag target, its prompts and references (a fixture)

SHORT_GPT2 = {"config": {**TINY["gpt2"], "n_positions": 48}, "seed": 5}
SHORT_LLAMA_MHA = {"config": {**TINY["llama"], "num_key_value_heads": 4, "max_position_embeddings": 40}, "seed": 5}


def _spec(draft, target=None, **strategy):
    spec = tiny_spec("llama", strategy={"kind": "speculative", "k": 3, **strategy})
    spec["target"] = dict(target or {})
    spec["draft"] = draft
    return spec


@pytest.mark.parametrize("draft,strategy,forward", [
    (SHORT_GPT2, {}, "auto"), (SHORT_GPT2, {"fused": False}, "auto"),
    (SHORT_GPT2, {"k_schedule": "heuristic", "k_max": 5}, "auto"), (SHORT_LLAMA_MHA, {"fused": False}, "contrib")])
def test_short_draft_limits_max_seq_len(draft, strategy, forward, tmp_path):
    """A speculative draft sees the target's positions: left out, max_seq_len becomes the draft's limit and a long
    generation stops there instead of crashing in the draft's position lookup; explicit and above it, an error."""
    limit = draft["config"].get("n_positions") or draft["config"]["max_position_embeddings"]
    art = dgopt.compile(_spec(draft, {"forward": forward}, **strategy), tmp_path / "a")
    dec = dgopt.load(art)
    assert dec.manifest["target"]["max_seq_len"] == limit
    assert yaml.safe_load((art / "ir.yaml").read_text())["target"]["max_seq_len"] == limit
    ref = hf_greedy(hf_model("llama"), PROMPTS[0], limit - len(PROMPTS[0]))
    for rows in ([PROMPTS[0]], PROMPTS[:3]):   # (near the end a step may hold k positions back: issue 24.4)
        out = dec.generate(rows, max_new_tokens=100).ids[0]
        assert out == ref[:len(out)] and len(out) >= limit - max(map(len, rows)) - 6
    with pytest.raises(DgoptError, match=rf"^spec field 'target.max_seq_len': 100 exceeds the model's "
                                         rf"max_position_embeddings 512 and the draft's max_position_embeddings "
                                         rf"{limit}$"):
        dgopt.compile(_spec(draft, {"max_seq_len": 100, "forward": forward}, **strategy), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_uag_draft_limit_is_its_own(tmp_path):
    """uag's draft counts its own tokens and stops drafting at its limit at run time: the target's default stays."""
    from dgopt.pipeline import _max_seq_len
    from dgopt.models.hf import load_model
    spec = spec_from_dict({**_spec(SHORT_GPT2), "strategy": {"kind": "uag"}})
    lm, dm = load_model(spec.model), load_model(spec.draft)
    assert _max_seq_len(spec, lm, dm) == 512
    spec = spec_from_dict(_spec(SHORT_GPT2))
    assert _max_seq_len(spec, lm, dm) == 48


def test_max_seq_len_default_follows_the_model(tmp_path):
    """Left out: min(1024, max_position_embeddings); explicit above it: an error; explicit below: kept. A dump of
    the spec leaves it out again (round trip)."""
    spec = tiny_spec("llama")
    del spec["target"]["max_seq_len"]
    assert spec_from_dict(spec).target.max_seq_len is None
    assert "max_seq_len" not in spec_from_dict(spec).to_dict()["target"]
    art = dgopt.compile(spec, tmp_path / "a")
    assert dgopt.load(art).manifest["target"]["max_seq_len"] == 512
    long = {**spec, "model": {**spec["model"], "config": {**TINY["llama"], "max_position_embeddings": 4096}}}
    assert dgopt.load(dgopt.compile(long, tmp_path / "b")).manifest["target"]["max_seq_len"] == 1024
    with pytest.raises(DgoptError, match=r"^spec field 'target.max_seq_len': 600 exceeds the model's "
                                         r"max_position_embeddings 512$"):
        dgopt.compile({**spec, "target": {"max_seq_len": 600}}, tmp_path / "c")
    assert dgopt.load(dgopt.compile({**spec, "target": {"max_seq_len": 100}}, tmp_path / "d")).manifest[
        "target"]["max_seq_len"] == 100


def test_dtype_names_of_transformers(tmp_path):
    """float32/float16/bfloat16 are accepted where fp32/fp16/bf16 are, and the manifest keeps the short spelling."""
    spec = tiny_spec("llama", target={"precision": "float32"})
    spec["model"]["dtype"] = "float32"
    s = spec_from_dict(spec)
    assert s.model.dtype == "fp32" and s.target.precision == "fp32"
    for long, short in (("float16", "fp16"), ("bfloat16", "bf16")):
        d = tiny_spec("llama", target={"precision": long, "device": "cuda"})
        d["model"]["dtype"] = long
        d["draft"] = {**SHORT_GPT2, "dtype": long}
        s = spec_from_dict({**d, "strategy": {"kind": "speculative"}})
        assert (s.model.dtype, s.draft.dtype, s.target.precision) == (short, short, short)
    with pytest.raises(DgoptError, match=r"^spec field 'model.dtype': Input should be 'fp32', 'fp16' or 'bf16'"):
        spec_from_dict({**spec, "model": {**spec["model"], "dtype": "float64"}})
    art = dgopt.compile(spec, tmp_path / "a")
    m = dgopt.load(art).manifest
    assert m["target"]["precision"] == "fp32"
    assert yaml.safe_load((art / "ir.yaml").read_text())["model"]["dtype"] == "fp32"


def test_uag_short_draft_runs_past_its_limit(pair, tmp_path):
    """uag end to end with a draft of 24 positions: the target's default max_seq_len stays 512 and the drafter
    stops at its own limit at run time, so the generation goes on past it with the target's tokens."""
    from test_uag import _pair_model
    short, _ = _pair_model(tmp_path, "short", "code-bpe-1k", 300, {**TINY["qwen2"], "max_position_embeddings": 24}, 1)
    spec = {"model": {"path": str(pair["target"])}, "draft": {"path": str(short)}, "strategy": {"kind": "uag", "k": 4}}
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "a"))
    assert dec.manifest["target"]["max_seq_len"] == 512
    assert dec.generate(pair["prompts"][:4], max_new_tokens=40).ids == pair["refs"][:4]
