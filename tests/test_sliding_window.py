"""Qwen2's sliding-window attention (use_sliding_window, max_window_layers): keys more than sliding_window positions
back are masked in the sliding layers, in every forward (direct, contrib, traced) and strategy, token-identical to
transformers past the window (it crashed there: the traced cache dropped keys the mask still covered)."""
import pytest

import dgopt
from conftest import PROMPTS, TINY, hf_greedy
from dgopt.models.hf import config_model

# layer 0 full, layer 1 sliding; 8 positions, passed by every prompt within 30 new tokens
SLIDING = {**TINY["qwen2"], "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
NEW = 30


@pytest.fixture(scope="module")
def refs():
    m = config_model(dict(SLIDING), 0).eval()
    assert m.config.layer_types == ["full_attention", "sliding_attention"]
    out = [hf_greedy(m, p, NEW) for p in PROMPTS]
    full = config_model(dict(TINY["qwen2"]), 0).eval()       # the window changes the tokens: the test can fail
    assert sum(r != hf_greedy(full, p, NEW) for r, p in zip(out, PROMPTS)) >= 3
    return out


@pytest.mark.parametrize("forward,strategy", [
    ("auto", {"kind": "autoregressive"}), ("direct", {"kind": "autoregressive"}),
    ("traced", {"kind": "autoregressive"}), ("direct", {"kind": "lookahead", "window": 3, "ngram": 3, "guesses": 3}),
    ("contrib", {"kind": "jacobi", "block": 4}), ("traced", {"kind": "jacobi", "block": 4}),
    ("contrib", {"kind": "speculative", "k": 3}), ("direct", {"kind": "speculative", "k": 3, "fused": False})])
def test_sliding_window_matches_hf(forward, strategy, refs, tmp_path):
    """One prompt at a time and the left-padded batch (the window counts positions, not padded slots); the
    speculative draft (another seed) rejects most proposals, leaving holes in the cache."""
    spec = {"model": {"config": SLIDING}, "strategy": strategy, "target": {"max_seq_len": 128, "forward": forward}}
    if strategy["kind"] == "speculative":
        spec["draft"] = {"config": SLIDING, "seed": 1}
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "a"))
    assert dec.manifest["model"]["forward"] == ("contrib" if forward == "auto" else forward)
    assert [dec.generate(p, max_new_tokens=NEW).ids[0] for p in PROMPTS[:2]] == refs[:2]
    assert dec.generate(PROMPTS, max_new_tokens=NEW).ids == refs
