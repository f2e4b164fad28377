"""The IO-binding session (KV cache kept on the device as OrtValues, KV commit as a device-side gather) is the one a
CUDA artifact uses; here it runs on the CPU EP, same code path, and must give the plain session's tokens for every
strategy, batch 1 and 4 (rows that accept different counts exercise the gather commit, a poor draft the cache
compaction)."""
import pytest

import dgopt
from dgopt.runtime.session import BoundSession
from conftest import PROMPTS, TINY, noisy_draft_dir, tiny_spec

STRATEGIES = {
    "autoregressive": {"kind": "autoregressive"},
    "lookahead": {"kind": "lookahead", "window": 4, "ngram": 3, "guesses": 3},
    "jacobi": {"kind": "jacobi", "block": 4},
    "speculative": {"kind": "speculative", "k": 3},                    # fused: two caches in one step
    "speculative-unfused": {"kind": "speculative", "k": 3, "fused": False},
    "speculative-small-draft": {"kind": "speculative", "k": 3},        # two kv parts of different shapes
    "speculative-sampling": {"kind": "speculative", "k": 3},
}
SMALL_DRAFT = {"config": {**TINY["llama"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "num_key_value_heads": 1}, "seed": 3}


@pytest.fixture(scope="module")
def noisy_draft(tmp_path_factory):
    return noisy_draft_dir(tmp_path_factory.mktemp("iob"), "noisy", 0.002)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_bound_session_matches_plain_session(name, noisy_draft, tmp_path):
    sampling = {"kind": "sample", "top_k": 20} if name.endswith("sampling") else {"kind": "greedy"}
    spec = tiny_spec("llama", strategy=STRATEGIES[name], sampling=sampling)
    if name.startswith("speculative"):
        spec["draft"] = SMALL_DRAFT if name.endswith("small-draft") else noisy_draft
    art = dgopt.compile(spec, tmp_path / name)
    plain, bound = dgopt.load(art), dgopt.load(art, io_binding=True)
    assert isinstance(bound.session, BoundSession) and not isinstance(plain.session, BoundSession)
    for rows in ([PROMPTS[0]], PROMPTS[:4]):
        a, b = plain.generate(rows, max_new_tokens=40, seed=3), bound.generate(rows, max_new_tokens=40, seed=3)
        assert a.ids == b.ids and a.stats["steps"] == b.stats["steps"]
    if name.endswith("small-draft"):      # a poor draft: its rejected slots make both caches compact (a gather)
        assert a.stats["cache_compactions"] == b.stats["cache_compactions"] >= 2


def test_bound_session_sampling_same_draws(tmp_path):
    art = dgopt.compile(tiny_spec("llama", sampling={"kind": "sample", "top_k": 20}), tmp_path / "s")
    a = dgopt.load(art).generate(PROMPTS[:3], max_new_tokens=24, seed=5)
    b = dgopt.load(art, io_binding=True).generate(PROMPTS[:3], max_new_tokens=24, seed=5)
    assert a.ids == b.ids


def test_bound_session_uag_on_trained_pair(tmp_path):
    """UAG cuts each row's draft cache back to a prefix (a commit with count 0) every step."""
    spec = {"model": {"name": "code-tiny"}, "draft": {"name": "code-draft-xtok"}, "strategy": {"kind": "uag", "k": 3},
            "target": {"max_seq_len": 256}}
    art = dgopt.compile(spec, tmp_path / "uag")
    plain, bound = dgopt.load(art), dgopt.load(art, io_binding=True)
    assert isinstance(bound.draft_session, BoundSession)
    rows = [plain.encode(t) for t in ("class Foo:\n    def ", "import os\n", "def main():\n    ")]
    a, b = plain.generate(rows, max_new_tokens=40), bound.generate(rows, max_new_tokens=40)
    assert a.ids == b.ids and a.stats["steps"] == b.stats["steps"]
