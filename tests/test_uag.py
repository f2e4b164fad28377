"""Universal Assisted Generation (greedy): a draft with a *different* tokenizer proposes text, the target verifies its
re-tokenization in one forward. Random-init pairs over two real byte-level BPE tokenizers (trained here on a slice
of the corpus, different vocab sizes and merges): token-identical to target-only transformers generate, batch 1 and
4, repeated calls identical, O0 == O2."""
import pytest

import dgopt
from dgopt.errors import SpecError
from dgopt.models import tokenizers_train as TT
from dgopt.models.hf import config_model
from conftest import TINY, hf_greedy, tiny_spec

NEW = 40
TEXTS = ["def __init__(self, name", "import os\nimport ", "    return self._", "class Foo:\n    def ", "x = [i for i"]


def _pair_model(root, name, tok_name, vocab, cfg, seed):
    tok = TT.train_tokenizer(tok_name, limit_bytes=150_000, vocab_size=vocab)
    m = config_model({**cfg, "vocab_size": len(tok)}, seed)
    m.save_pretrained(root / name)
    TT.save_tokenizer(tok, root / name)
    return root / name, tok


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("uag")
    target, ttok = _pair_model(root, "target", "code-bpe-4k", 512, TINY["llama"], 0)
    draft, dtok = _pair_model(root, "draft", "code-bpe-1k", 300,
                              {**TINY["qwen2"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 1}, 1)
    # the target's own weights as the draft, through the text round trip
    same, _ = _pair_model(root, "same-weights-other-tok", "code-bpe-4k", 512, TINY["llama"], 0)
    prompts = [ttok(t)["input_ids"] for t in TEXTS]
    model = config_model({**TINY["llama"], "vocab_size": len(ttok)}, 0).eval()
    refs = [hf_greedy(model, p, NEW) for p in prompts]
    assert len(ttok) != len(dtok)
    return {"target": target, "draft": draft, "same": same, "prompts": prompts, "refs": refs, "model": model}


def compile_uag(tmp_path, pair, draft="draft", k=4, opt_level=2, schedule="constant", confidence=0.0, penalty=1.0):
    spec = {"model": {"path": str(pair["target"])}, "draft": {"path": str(pair[draft])},
            "strategy": {"kind": "uag", "k": k, "k_schedule": schedule, "k_max": 6, "confidence": confidence},
            "sampling": {"kind": "greedy", "repetition_penalty": penalty}, "target": {"max_seq_len": 256}}
    return dgopt.load(dgopt.compile(
        spec, tmp_path / f"uag-{draft}-{k}-{opt_level}-{schedule}-{confidence}-{penalty}", opt_level=opt_level))


@pytest.mark.parametrize("draft,schedule,confidence", [
    ("draft", "constant", 0.0), ("same", "constant", 0.0), ("draft", "heuristic", 0.0), ("same", "heuristic", 0.0),
    ("draft", "heuristic", 0.0045), ("draft", "constant", 0.0045)])
def test_uag_greedy_exact_batch1_and_batch4(draft, schedule, confidence, pair, tmp_path):
    """k_schedule heuristic or a confidence threshold: the draft's chain is a draft_loop (draft_k in draft.onnx);
    the step verifies as many candidates as a step has (verify_greedy length -1) under either schedule."""
    dec = compile_uag(tmp_path, pair, draft, schedule=schedule, confidence=confidence)
    assert ("draft_k" in dec.draft_session.inputs) == (schedule == "heuristic" or confidence > 0)
    if confidence:      # near uniform over its ids, the random draft gives its argmax ~0.0045: stops sometimes
        from test_draft_confidence import record_chains
        chains = record_chains(dec)
    assert (dec.path / "draft_tokenizer" / "tokenizer.json").is_file()
    for p, ref in zip(pair["prompts"], pair["refs"]):
        assert dec.generate(p, max_new_tokens=NEW).ids[0] == ref
    res = dec.generate(pair["prompts"][:4], max_new_tokens=NEW)
    assert res.ids == pair["refs"][:4]
    assert {"acceptance_rate", "draft_s", "target_s", "tokens_per_step"} <= set(res.stats)
    if confidence:
        early = [n < k for k, n in chains]
        assert any(early) and not all(early), chains
    # no acceptance threshold here: random weights emit lone UTF-8 bytes that no text round trip preserves; the
    # trained pairs (test_trained_models.py) check that translation keeps what the draft gets right


@pytest.mark.parametrize("schedule,confidence,penalty", [("constant", 0.0, 1.0), ("heuristic", 0.0, 1.0),
                                                      ("heuristic", 0.0045, 1.0), ("heuristic", 0.0, 1.8)])
def test_uag_alone_equals_batch(schedule, confidence, penalty, pair, tmp_path):
    """One prompt alone and the prompts as a batch give the same tokens, both equal to transformers generate (with a
    repetition penalty too)."""
    dec = compile_uag(tmp_path, pair, schedule=schedule, confidence=confidence, penalty=penalty)
    refs = pair["refs"]
    if penalty != 1.0:
        model = config_model({**TINY["llama"], "vocab_size": dec.vocab_size}, 0).eval()
        refs = [hf_greedy(model, p, NEW, repetition_penalty=penalty) for p in pair["prompts"]]
        assert refs != pair["refs"]
        assert "seen" in dec.session.inputs
    batch = dec.generate(pair["prompts"], max_new_tokens=NEW)
    for i, (p, ref) in enumerate(zip(pair["prompts"], refs)):
        one = dec.generate(p, max_new_tokens=NEW)
        assert one.ids == [ref] and batch.ids[i] == ref
        assert "draft_s" in one.stats and "fused" not in one.stats


def test_uag_O0_equals_O2_and_repeated_calls(pair, tmp_path):
    d0, d2 = compile_uag(tmp_path, pair, k=3, opt_level=0), compile_uag(tmp_path, pair, k=3, opt_level=2)
    r0, r2 = d0.generate(pair["prompts"], max_new_tokens=NEW), d2.generate(pair["prompts"], max_new_tokens=NEW)
    again = d2.generate(pair["prompts"], max_new_tokens=NEW)
    assert r0.ids == r2.ids == again.ids == pair["refs"]
    assert r0.stats["steps"] == r2.stats["steps"] == again.stats["steps"]


def test_uag_text_prompt(pair, tmp_path):
    dec = compile_uag(tmp_path, pair)
    res = dec.generate(TEXTS[0], max_new_tokens=NEW)
    assert res.ids[0] == pair["refs"][0] and res.text[0] == dec.decode(pair["refs"][0])


def test_uag_needs_tokenizers(pair, tmp_path):
    spec = {"model": {"path": str(pair["target"])}, "draft": {"config": dict(TINY["llama"]), "seed": 0},
            "strategy": {"kind": "uag"}, "target": {"max_seq_len": 256}}
    with pytest.raises(SpecError, match="'draft'.*tokenizer"):
        dgopt.compile(spec, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SpecError, match="'draft'"):
        dgopt.compile(tiny_spec(strategy={"kind": "uag"}), tmp_path / "y")


def test_incremental_translation_state_matches_full(pair):
    """The drafter keeps the committed text and its draft encoding incrementally; after every step the text equals
    a full decode and the draft ids decode back to exactly that text (multi-byte characters split across steps)."""
    import random
    from transformers import AutoTokenizer
    from dgopt.runtime.strategies.uag import XTokDrafter
    d = object.__new__(XTokDrafter)
    d.tt = AutoTokenizer.from_pretrained(pair["target"]).backend_tokenizer
    d.dt = AutoTokenizer.from_pretrained(pair["draft"]).backend_tokenizer
    text = "def größe(self, naïve='∑ ✓'):\n    return {'π': 3.14}  # café\n\tx = [i for i in range(10)]\n" * 3
    ids = d.tt.encode(text, add_special_tokens=False).ids
    d.seqs, d.text, d.n_text, d.want, d.start, d.kept = [[]], [""], [0], [[]], [[]], [0]
    rng, n = random.Random(0), 0
    while n < len(ids):
        n = min(len(ids), n + rng.randint(1, 5))
        d.seqs[0] = ids[:n]
        d._update_text(0)
        full = d.tt.decode(ids[:n], skip_special_tokens=False)
        assert d.text[0] == full
        assert d.dt.decode(d._encode(0), skip_special_tokens=False) == full


@pytest.mark.parametrize("schedule", ["constant", "heuristic"])
def test_uag_candidates_shrink_to_fit_max_seq_len(schedule, pair, tmp_path):
    """Greedy UAG holds no positions back for k: near target.max_seq_len it generates as many tokens as
    autoregressive decoding (max_seq_len - prompt, per row), the same ones, one prompt and a batch, and no call sees a
    position past the limit. ("same" proposes the target's own tokens: full k.)"""
    spec = {"model": {"path": str(pair["target"])}, "draft": {"path": str(pair["same"])},
            "strategy": {"kind": "uag", "k": 4, "k_schedule": schedule, "k_max": 6},
            "sampling": {"kind": "greedy"}, "target": {"max_seq_len": 40}}
    dec = dgopt.load(dgopt.compile(spec, tmp_path / f"uag-fit-{schedule}"))
    top = []
    def run(feeds, cache, _run=dec.session.run):
        top.append(int(feeds["verify_position_ids"].max()))
        return _run(feeds, cache)
    dec.session.run = run
    model = pair["model"]
    for p in pair["prompts"][:2]:
        res = dec.generate(p, max_new_tokens=100)
        assert len(res.ids[0]) == 40 - len(p) and res.stats["stop"] == ["max_seq_len"], res.stats
        assert res.ids[0] == hf_greedy(model, p, 40 - len(p))
    batch = dec.generate(pair["prompts"][:4], max_new_tokens=100)      # each row its own budget
    assert [len(r) for r in batch.ids] == [40 - len(p) for p in pair["prompts"][:4]]
    assert batch.ids == [hf_greedy(model, p, 40 - len(p)) for p in pair["prompts"][:4]]
    assert max(top) == 39
