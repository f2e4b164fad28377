"""One prompt of fused speculative decoding runs speculative_row's loop (Python ints instead of [B] arrays): it must
give what the batch loop gives for that prompt — the same tokens and the same stats (steps, accepted lengths,
proposals, cache compactions, stop reasons) — for every kind of fused step: constant k, the heuristic, an early
stop, a repetition penalty, a draft with a smaller vocabulary, a poor draft whose holes make the caches compact,
sampling (same seed, same draws), and a budget cut by max_seq_len or max_new_tokens."""
import pytest

import dgopt
from conftest import PROMPTS, TINY, hf_greedy, hf_model, noisy_draft_dir, tiny_spec
from dgopt.runtime.multitoken import generate_multitoken

SAME_STATS = ("steps", "new_tokens", "tokens_per_step", "accepted_hist", "stop", "acceptance_rate", "mean_k",
              "cache_compactions", "fused")
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
def test_one_row_loop_equals_batch_loop(name, strategy, sampling, draft, noisy, tmp_path, monkeypatch):
    import dgopt.runtime.speculative_row as row_mod
    calls = []
    real = row_mod.generate_speculative_row
    monkeypatch.setattr(row_mod, "generate_speculative_row", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = tiny_spec("llama", strategy={"kind": "speculative", **strategy}, sampling={"kind": "greedy", **sampling})
    spec["draft"] = noisy if draft == "noisy" else draft
    dec = dgopt.load(dgopt.compile(spec, tmp_path / name))
    model = hf_model("llama")
    pen = sampling.get("repetition_penalty", 1.0)
    sampled = sampling.get("kind") == "sample"
    for i, p in enumerate(PROMPTS):
        for new in (48, 230) if i < 2 else (48,):       # 230: max_seq_len 256 cuts the budget
            fast = dec.generate(p, max_new_tokens=new, seed=i)
            slow = generate_multitoken(dec, [p], new, one_row=False, seed=i)
            assert fast.ids == slow.ids, (name, new)
            assert {s: fast.stats[s] for s in SAME_STATS} == {s: slow.stats[s] for s in SAME_STATS}, (name, new)
        if not sampled:
            assert fast.ids[0][:48] == hf_greedy(model, p, 48, repetition_penalty=pen)
    assert len(calls) == len(PROMPTS) + 2               # every dec.generate above took the one-row loop
    if sampled:     # the seed reaches the one-row loop's noise: another seed, other tokens
        assert dec.generate(PROMPTS[0], max_new_tokens=48, seed=1).ids != \
            dec.generate(PROMPTS[0], max_new_tokens=48, seed=2).ids
    if name == "weak":
        assert fast.stats["cache_compactions"] > 0
    seen = []
    assert dec.generate(PROMPTS[0], max_new_tokens=20, on_token=seen.append).ids[0] == [t[0] for t in seen]
