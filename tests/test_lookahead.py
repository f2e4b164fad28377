"""Lookahead and Jacobi decoding: greedy output token-identical to transformers generate; -O0 (two forwards) and
-O2 (merge_forwards: one forward) give identical tokens AND identical step counts; degenerate settings reduce to
autoregressive; the merged forward is numerically the two forwards."""
import numpy as np
import onnx
import pytest
import torch

import dgopt
from dgopt.backends.reference import run_graph
from dgopt.ir import verify
from dgopt.passes import MergeForwards
from dgopt.pipeline import build_ir
from dgopt.spec import spec_from_dict
from conftest import PROMPTS, hf_greedy, hf_model, tiny_spec

NEW = 64
LA = {"kind": "lookahead", "window": 4, "ngram": 3, "guesses": 3}
JACOBI = {"kind": "jacobi", "block": 4}
JACOBI_CHAIN = {"kind": "jacobi", "block": 4, "guess": "chain"}


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(family):
        if family not in cache:
            m = hf_model(family)
            cache[family] = [hf_greedy(m, p, NEW) for p in PROMPTS]
        return cache[family]
    return get


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("strategy", [LA, JACOBI, JACOBI_CHAIN], ids=["lookahead", "jacobi", "jacobi-chain"])
def test_greedy_exact_batch1_and_batch4(family, strategy, artifacts, refs):
    dec = dgopt.load(artifacts(family, strategy=strategy))
    expected = refs(family)
    for p, ref in zip(PROMPTS, expected):
        assert dec.generate(p, max_new_tokens=NEW).ids[0] == ref
    assert dec.generate(PROMPTS[:4], max_new_tokens=NEW).ids == expected[:4]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_O0_and_O2_same_tokens_and_steps(family, artifacts):
    d0, d2 = dgopt.load(artifacts(family, 0, strategy=LA)), dgopt.load(artifacts(family, 2, strategy=LA))
    assert not d0.manifest["pipeline"]["passes"]
    merged = [p for p in d2.manifest["pipeline"]["passes"] if p["name"] == "merge_forwards"]
    assert merged and merged[0]["modified"]
    for batch in ([PROMPTS[0]], PROMPTS[:4]):
        r0, r2 = d0.generate(batch, max_new_tokens=NEW), d2.generate(batch, max_new_tokens=NEW)
        assert r0.ids == r2.ids and r0.stats["steps"] == r2.stats["steps"]
        assert r0.stats["accepted_hist"] == r2.stats["accepted_hist"]
    assert r2.stats["tokens_per_step"] > 1.0       # the random model repeats itself: candidates get accepted


def test_jacobi_ngram_guess_commits_more_per_step(artifacts, refs):
    """guess: ngram (the continuation of a repeated suffix, then the chain's rest) vs the chain's rest alone: same
    tokens, fewer steps on text that repeats itself (a random model's greedy output loops)."""
    ng = dgopt.load(artifacts("llama", strategy={"kind": "jacobi", "block": 6}))
    ch = dgopt.load(artifacts("llama", strategy={"kind": "jacobi", "block": 6, "guess": "chain"}))
    assert ng.manifest["strategy"]["guess"] == "ngram" and ch.manifest["strategy"]["guess"] == "chain"
    a, b = ng.generate(PROMPTS[:4], max_new_tokens=NEW), ch.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert a.ids == b.ids == refs("llama")[:4]
    assert a.stats["tokens_per_step"] > 1.2 * b.stats["tokens_per_step"]    # 1.33 vs 1.0 here


def test_degenerate_lookahead_is_autoregressive(artifacts):
    ar = dgopt.load(artifacts("llama"))
    la = dgopt.load(artifacts("llama", strategy={"kind": "lookahead", "window": 1, "ngram": 1, "guesses": 0}))
    for p in PROMPTS[:3]:
        a, b = ar.generate(p, max_new_tokens=NEW), la.generate(p, max_new_tokens=NEW)
        assert a.ids == b.ids and a.stats["steps"] == b.stats["steps"] == NEW
        assert b.stats["accepted_hist"] == {"1": NEW}


def test_repeated_calls_identical_and_eos(artifacts, refs):
    dec = dgopt.load(artifacts("qwen2", strategy=LA))
    a = dec.generate(PROMPTS[:3], max_new_tokens=NEW)
    b = dec.generate(PROMPTS[:3], max_new_tokens=NEW)
    assert a.ids == b.ids and a.stats["steps"] == b.stats["steps"]
    eos = refs("qwen2")[0][20]
    dec.eos = {eos}
    res = dec.generate(PROMPTS[0], max_new_tokens=NEW)
    ref = refs("qwen2")[0]
    assert res.ids[0] == ref[:ref.index(eos) + 1] and res.stats["stop"] == ["eos"]


def test_max_seq_len_respected(artifacts):
    dec = dgopt.load(artifacts("llama", strategy=LA))
    dec.max_seq_len = 40
    res = dec.generate(PROMPTS[2], max_new_tokens=100)         # 11 prompt tokens: as many new as autoregressive
    assert len(res.ids[0]) == 40 - 11 and res.stats["stop"] == ["max_seq_len"]
    assert res.ids[0] == hf_greedy(hf_model("llama"), PROMPTS[2], 29)


def test_merge_forwards_structure():
    g = build_ir(spec_from_dict(tiny_spec(strategy=LA)))
    assert len(g.find("forward")) == 2
    res = MergeForwards()(g)
    assert res.modified
    after = res.graph
    verify(after)
    fwd = after.find("forward")
    assert len(fwd) == 1 and fwd[0].id == "merged/target"
    assert sorted(n.op for n in after.nodes() if n.meta.get("created_by") == "merge_forwards") == [
        "concat_seq", "concat_seq", "forward", "merge_masks", "split_kv", "split_seq"]
    assert after.outputs["present"].node == "merged/target/split_kv"
    assert not MergeForwards()(after).modified


def test_merge_forwards_numerics_reference():
    """Reference interpreter: merged forward's split logits/KV equal the two separate forwards' (random inputs,
    a real past, and random masks with some blocked keys)."""
    from dgopt.models.hf import LoadedModel, _info
    spec = spec_from_dict(tiny_spec(strategy=LA))
    g = build_ir(spec)
    merged = MergeForwards()(g).graph
    model = hf_model("llama")
    models = {"target": LoadedModel(model, "llama", "t", None, _info(model, "llama"))}
    rng = np.random.default_rng(0)
    B, P, qa, qb, H, D = 2, 5, 7, 4, 2, 16
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))

    def mask(q):
        m = np.where(rng.random((B, 1, q, P + q)) < 0.7, 0.0, np.finfo(np.float32).min).astype(np.float32)
        m[..., P:] = np.where(np.tril(np.ones((q, q), bool)), m[..., P:], np.finfo(np.float32).min)
        m[..., 0] = 0.0
        return m
    feeds = {"past": [t(rng.normal(size=(B, H, P, D)).astype(np.float32)) for _ in range(4)],
             "lookahead_ids": t(rng.integers(0, 320, (B, qa))), "verify_ids": t(rng.integers(0, 320, (B, qb))),
             "lookahead_position_ids": t(P + rng.integers(0, 6, (B, qa))),
             "verify_position_ids": t(P + np.arange(qb)[None].repeat(B, 0)),
             "lookahead_mask": t(mask(qa)), "verify_mask": t(mask(qb)),
             "candidates": t(rng.integers(0, 320, (B, 3, 2)))}
    feeds["verify_ids"] = feeds["verify_ids"][:, :1 + 3 * 2 - 3]   # k=1 x-token + 3 candidates x 2 tokens = 7
    feeds["verify_ids"] = t(rng.integers(0, 320, (B, 7)))
    feeds["verify_position_ids"] = t(P + np.arange(7)[None].repeat(B, 0))
    feeds["verify_mask"] = t(mask(7))
    a = run_graph(g, feeds, models)
    b = run_graph(merged, feeds, models)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, list):
            for u, v in zip(x, y):
                assert torch.allclose(u, v, atol=1e-5)
        else:
            assert torch.equal(x, y) if x.dtype == torch.int64 else torch.allclose(x, y, atol=1e-5)


def test_O2_runs_one_forward(artifacts):
    dec = dgopt.load(artifacts("llama", strategy=LA))
    m = onnx.load(str(dec.path / "step.onnx"))
    roots = {n.name.split("/")[0] for n in m.graph.node if n.op_type == "MatMul"}
    assert roots == {"merged"}


def test_lookahead_spec_errors(tmp_path):
    from dgopt.errors import SpecError
    with pytest.raises(SpecError, match="sampling.noise"):      # its noise is drawn on the host, per depth
        spec_from_dict(tiny_spec(strategy=LA, sampling={"kind": "sample", "noise": "in_graph"}))
    with pytest.raises(SpecError, match="guesses"):
        spec_from_dict(tiny_spec(strategy={"kind": "lookahead", "ngram": 1, "guesses": 2}))
