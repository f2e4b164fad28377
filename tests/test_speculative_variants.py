"""Every kind of fused speculative step (constant k, the heuristic, an early stop, a repetition penalty, a draft with
a smaller vocabulary, a poor draft whose holes make the caches compact, sampling) through the one decode loop:
greedy equals transformers (also with a budget that max_seq_len cuts), a prompt alone equals the same prompt as a
row of a batch, a seeded sampled run repeats and another seed differs, and streaming sees every token."""
import pytest

import dgopt
from conftest import PROMPTS, TINY, hf_greedy, hf_model, noisy_draft_dir, tiny_spec

WEAK = {"config": {**TINY["llama"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "num_key_value_heads": 1}, "seed": 3}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return noisy_draft_dir(tmp_path_factory.mktemp("drafts"), "noisy", 0.002)


@pytest.mark.parametrize("name,strategy,sampling,draft", [
    ("constant", {"k": 3}, {}, "noisy"),
    ("heuristic", {"k": 2, "k_schedule": "heuristic", "k_max": 6}, {}, "noisy"),
    ("early-stop", {"k": 3, "k_schedule": "heuristic", "k_max": 6, "confidence": 0.005}, {}, "noisy"),
    ("penalty", {"k": 3, "k_schedule": "heuristic", "k_max": 6}, {"repetition_penalty": 1.5}, "noisy"),
    ("smaller-vocab", {"k": 3}, {}, {"config": {**TINY["gpt2"], "vocab_size": 200}, "seed": 2}),
    ("weak", {"k": 4}, {}, WEAK),
    ("sample", {"k": 3}, {"kind": "sample", "temperature": 0.8, "top_k": 6}, "noisy"),
    ("sample-penalty", {"k": 2}, {"kind": "sample", "top_p": 0.9, "repetition_penalty": 1.5}, "noisy"),
])
def test_speculative_variants(name, strategy, sampling, draft, noisy, tmp_path):
    spec = tiny_spec("llama", strategy={"kind": "speculative", **strategy}, sampling={"kind": "greedy", **sampling})
    spec["draft"] = noisy if draft == "noisy" else draft
    dec = dgopt.load(dgopt.compile(spec, tmp_path / name))
    model = hf_model("llama")
    pen = sampling.get("repetition_penalty", 1.0)
    sampled = sampling.get("kind") == "sample"
    alone = []
    for i, p in enumerate(PROMPTS):
        for new in (48, 256 - len(p) + 5) if i < 2 else (48,):       # the second: max_seq_len 256 cuts the budget
            res = dec.generate(p, max_new_tokens=new, seed=i)
            assert res.ids == dec.generate(p, max_new_tokens=new, seed=i).ids, (name, new)     # repeatable
            assert len(res.ids[0]) == min(new, 256 - len(p)) or res.stats["stop"] == ["eos"]
            if not sampled:
                assert res.ids[0] == hf_greedy(model, p, len(res.ids[0]), repetition_penalty=pen), (name, new)
        alone.append(dec.generate(p, max_new_tokens=48).ids[0])
    if not sampled:
        assert dec.generate(PROMPTS, max_new_tokens=48).ids == alone
    else:       # the seed reaches the noise: another seed, other tokens
        assert dec.generate(PROMPTS[0], max_new_tokens=48, seed=1).ids != \
            dec.generate(PROMPTS[0], max_new_tokens=48, seed=2).ids
    if name == "weak":
        assert res.stats["cache_compactions"] > 0
    seen = []
    assert dec.generate(PROMPTS[0], max_new_tokens=20, on_token=seen.append).ids[0] == [t[0] for t in seen]
