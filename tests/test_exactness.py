"""Greedy dgopt output == transformers generate(do_sample=False), token for token."""
import pytest

import dgopt
from conftest import PROMPTS, hf_greedy, hf_model

NEW = 64


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_greedy_matches_hf_batch1_and_batch4(family, artifacts):
    dec = dgopt.load(artifacts(family))
    model = hf_model(family)
    refs = [hf_greedy(model, p, NEW) for p in PROMPTS]
    for p, ref in zip(PROMPTS, refs):                       # batch 1
        assert dec.generate(p, max_new_tokens=NEW).ids[0] == ref
    batch = PROMPTS[:4]                                       # batch 4, prompts of lengths 5, 3, 11, 1 (left-padded)
    assert dec.generate(batch, max_new_tokens=NEW).ids == refs[:4]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_O0_and_O2_identical(family, artifacts):
    d0, d2 = dgopt.load(artifacts(family, 0)), dgopt.load(artifacts(family, 2))
    assert d0.manifest["pipeline"]["passes"] == []
    assert [p["name"] for p in d2.manifest["pipeline"]["passes"] if p["modified"]]
    assert d0.generate(PROMPTS[:4], max_new_tokens=NEW).ids == d2.generate(PROMPTS[:4], max_new_tokens=NEW).ids


def test_repeated_generate_calls_identical(artifacts):
    dec = dgopt.load(artifacts("qwen2"))
    a = dec.generate(PROMPTS[:2], max_new_tokens=NEW).ids
    b = dec.generate(PROMPTS[:2], max_new_tokens=NEW).ids
    assert a == b


def test_eos_stops_row_like_hf(artifacts):
    """A model whose eos is a token it actually emits: the row stops at it, EOS included, as HF does."""
    dec = dgopt.load(artifacts("llama"))
    model = hf_model("llama")
    free = hf_greedy(model, PROMPTS[0], NEW)
    eos = free[10]
    model.generation_config.eos_token_id = eos
    ref = hf_greedy(model, PROMPTS[0], NEW)
    dec.eos = {eos}
    res = dec.generate(PROMPTS[0], max_new_tokens=NEW)
    assert res.ids[0] == ref and res.ids[0][-1] == eos and res.stats["stop"] == ["eos"]


def test_max_seq_len_stops_cleanly(artifacts):
    dec = dgopt.load(artifacts("llama"))
    dec.max_seq_len = 20
    res = dec.generate(PROMPTS[2], max_new_tokens=100)          # 11 prompt tokens
    assert len(res.ids[0]) == 9 and res.stats["stop"] == ["max_seq_len"]
    assert res.ids[0] == hf_greedy(hf_model("llama"), PROMPTS[2], 9)


def test_repetition_penalty_matches_hf(artifacts):
    dec = dgopt.load(artifacts("llama", sampling={"kind": "greedy", "repetition_penalty": 1.8}))
    assert "seen" in dec.session.inputs
    model = hf_model("llama")
    import torch
    for p in PROMPTS[:3]:
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             repetition_penalty=1.8)[0, len(p):].tolist()
        assert dec.generate(p, max_new_tokens=32).ids[0] == ref
