"""strategy.draft_max_batch on every multi-token kind: a call of more rows runs the autoregressive artifact nested in
the artifact, a smaller one the strategy's own step. Greedy: both paths token-identical to transformers, and rows
join a fallback call (continuous batching) as they join any autoregressive call. Sampled: the large call is exactly
what the nested autoregressive sampler draws with that seed (recycle's own test is in test_recycle.py)."""
import pytest

import dgopt
from conftest import PROMPTS, hf_greedy, hf_model, noisy_draft_dir, tiny_spec
from dgopt.errors import DgoptError

NEW = 24


@pytest.fixture(scope="module")
def refs():
    m = hf_model("llama")
    return [hf_greedy(m, p, NEW) for p in PROMPTS]


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    return noisy_draft_dir(tmp_path_factory.mktemp("draft"), "noisy", 0.002)


@pytest.mark.parametrize("strategy", [
    {"kind": "speculative", "k": 3},
    {"kind": "speculative", "k": 3, "fused": False},
    {"kind": "lookahead", "window": 3, "ngram": 3, "guesses": 2},
    {"kind": "jacobi", "block": 4},
    {"kind": "ngram", "k": 3},
], ids=lambda s: "-".join(str(v) for v in s.values()))
def test_greedy_both_paths_token_identical(strategy, draft, refs, tmp_path):
    spec = tiny_spec("llama", strategy={**strategy, "draft_max_batch": 2}, target={"max_batch": 8})
    if strategy["kind"] == "speculative":
        spec["draft"] = draft
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "a"))
    assert dec.manifest["fallback"] == {"dir": "autoregressive", "above_batch": 2}
    small, big = dec.generate(PROMPTS[:2], max_new_tokens=NEW), dec.generate(PROMPTS, max_new_tokens=NEW)
    assert small.ids == refs[:2] and big.ids == refs
    assert "fallback" not in small.stats and "accepted_hist" in small.stats
    assert big.stats["fallback"] == "autoregressive" and big.stats["tokens_per_step"] == 1.0
    assert "draft" not in dgopt.load(tmp_path / "a" / "autoregressive").manifest


def test_sampled_large_call_is_the_autoregressive_sampler(draft, tmp_path):
    sampling = {"kind": "sample", "temperature": 0.9, "top_k": 20}
    spec = tiny_spec("llama", strategy={"kind": "speculative", "k": 3, "draft_max_batch": 1}, sampling=sampling)
    spec["draft"] = draft
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "spec"))
    ar = dgopt.load(dgopt.compile(tiny_spec("llama", sampling=sampling), tmp_path / "ar"))
    big = dec.generate(PROMPTS[:3], max_new_tokens=NEW, seed=5)
    assert big.ids == ar.generate(PROMPTS[:3], max_new_tokens=NEW, seed=5).ids
    assert big.ids != ar.generate(PROMPTS[:3], max_new_tokens=NEW, seed=6).ids
    assert "fallback" not in dec.generate(PROMPTS[0], max_new_tokens=NEW, seed=5).stats


def test_autoregressive_has_nothing_to_fall_back_from(tmp_path):
    with pytest.raises(DgoptError, match="draft_max_batch applies to multi-token strategies"):
        dgopt.compile(tiny_spec("llama", strategy={"kind": "autoregressive", "draft_max_batch": 2}), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_rows_join_a_fallback_call_but_not_the_strategys(draft, refs, tmp_path):
    spec = tiny_spec("llama", strategy={"kind": "speculative", "k": 3, "draft_max_batch": 2}, target={"max_batch": 5})
    spec["draft"] = draft
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "a"))
    got = {i: [] for i in range(len(PROMPTS))}
    owner, asked = {0: 0, 1: 1, 2: 2}, [0]

    def on_token(toks):
        for b, t in enumerate(toks):
            if t is not None:
                got[owner[b]].append(t)

    def admit(free):        # prompts 3 and 4 arrive at the third step
        asked[0] += 1
        if asked[0] != 3:
            return []
        out, n = [], len(owner)
        for i in (3, 4):
            b = free.pop(0) if free else n
            n += b == n
            owner[b] = i
            out.append((b, PROMPTS[i], NEW))
        return out
    res = dec.generate(PROMPTS[:3], max_new_tokens=NEW, on_token=on_token, admit=admit)
    assert res.stats["fallback"] == "autoregressive" and res.stats["joined"] == 2
    assert [got[i] for i in range(5)] == refs
    asked[0] = 0
    small = dec.generate(PROMPTS[:2], max_new_tokens=NEW, admit=admit)      # speculative: takes none
    assert small.ids == refs[:2] and "joined" not in small.stats and asked[0] == 0
