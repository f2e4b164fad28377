"""The one decode loop's limits, for every strategy: max_new_tokens 0 returns nothing; near target.max_seq_len every
strategy generates what autoregressive decoding generates (the same tokens, as many: max_seq_len - prompt per row,
also in a batch of different lengths) and no call sees a position past the limit; per-row max_new_tokens; rows
cancelled by should_stop."""
import pytest

import dgopt
from conftest import PROMPTS, hf_greedy, hf_model, noisy_draft_dir, tiny_spec

MAX = 48
STRATEGIES = {
    "autoregressive": {"kind": "autoregressive"},
    "lookahead": {"kind": "lookahead", "window": 5, "ngram": 4, "guesses": 3},
    "jacobi": {"kind": "jacobi", "block": 6},
    "speculative": {"kind": "speculative", "k": 4},
    "speculative-unfused": {"kind": "speculative", "k": 4, "fused": False},
    "speculative-heuristic": {"kind": "speculative", "k": 3, "k_schedule": "heuristic", "k_max": 6},
}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    draft = noisy_draft_dir(root, "draft", 0.002)
    out = {}
    for name, st in STRATEGIES.items():
        spec = tiny_spec(strategy=st, target={"max_seq_len": MAX})
        if st["kind"] == "speculative":
            spec["draft"] = draft
        out[name] = dgopt.load(dgopt.compile(spec, root / name))
    return out


def _positions(dec):
    """Wrap the session (and a draft session) to record the largest position any call sees."""
    top = []
    for sess in (dec.session, dec.draft_session):
        if sess is None:
            continue
        def run(feeds, cache, _run=sess.run):
            top.extend(int(v.max()) for k, v in feeds.items() if k.endswith("position_ids"))
            return _run(feeds, cache)
        sess.run = run
    return top


@pytest.mark.parametrize("name", STRATEGIES)
def test_zero_new_tokens(name, decoders):
    res = decoders[name].generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=0)
    assert res.ids == [[], []] and res.stats["steps"] == 0


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_fills_max_seq_len_like_autoregressive(name, decoders):
    dec = decoders[name]
    model = hf_model("llama")
    top = _positions(dec)
    long = list(range(3, 3 + 40))                       # 40 of 48 positions: 8 new tokens, fewer than one window
    rows = [long, PROMPTS[0], PROMPTS[2]]
    res = dec.generate(rows, max_new_tokens=100)
    for r, ids, stop in zip(rows, res.ids, res.stats["stop"]):
        assert len(ids) == MAX - len(r) and stop == "max_seq_len", (name, len(r), len(ids))
        assert ids == hf_greedy(model, r, MAX - len(r)), name
    assert max(top) <= MAX - 1
    one = dec.generate(long, max_new_tokens=100)
    assert one.ids == [res.ids[0]]


@pytest.mark.parametrize("name", ["autoregressive", "lookahead", "speculative"])
def test_per_row_budgets_and_cancel(name, decoders):
    dec = decoders[name]
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    full = dec.generate(rows, max_new_tokens=12)
    res = dec.generate(rows, max_new_tokens=[3, 12, 0])
    assert res.ids == [full.ids[0][:3], full.ids[1], []]
    assert res.stats["stop"] == ["max_new_tokens"] * 3
    steps = []

    def stop_row_1():
        steps.append(1)
        return [1] if len(steps) == 2 else []
    res = dec.generate(rows, max_new_tokens=12, should_stop=stop_row_1)
    assert res.stats["stop"][1] == "cancelled" and res.ids[1] == full.ids[1][:len(res.ids[1])]
    assert len(res.ids[1]) < 12 and res.ids[0] == full.ids[0] and res.ids[2] == full.ids[2]
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(rows, max_new_tokens=-1)
