"""Strategy ngram (prompt lookup): greedy token-identical to transformers generate (llama, gpt2 and qwen2, one
prompt and a left-padded batch, a repetition penalty, one guess of varying length and several of fixed length);
-O0 and -O2 give the same tokens and steps; a document searched before the context raises tokens per step without
changing the output; sampled: the first token and two-token joint follow the exact distribution (chi-square)."""
import pytest

import dgopt
from conftest import PROMPTS, chi2_pvalue, exact_two_tokens, hf_greedy, hf_model, tiny_spec
from dgopt.errors import SpecError
from dgopt.spec import spec_from_dict

NEW = 48
ONE = {"kind": "ngram", "k": 4}
MANY = {"kind": "ngram", "k": 3, "guesses": 3, "max_ngram": 2}


@pytest.fixture(scope="module")
def refs():
    cache = {}

    def get(family, penalty=1.0):
        if (family, penalty) not in cache:
            m = hf_model(family)
            cache[family, penalty] = [hf_greedy(m, p, NEW, penalty) for p in PROMPTS]
        return cache[family, penalty]
    return get


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("strategy", [ONE, MANY], ids=["one_guess", "three_guesses"])
def test_greedy_exact_one_prompt_and_batch(family, strategy, artifacts, refs):
    dec = dgopt.load(artifacts(family, strategy=strategy))
    expected = refs(family)
    steps = 0
    for p, ref in zip(PROMPTS, expected):
        res = dec.generate(p, max_new_tokens=NEW)
        assert res.ids[0] == ref
        steps += res.stats["steps"]
    assert steps < len(PROMPTS) * NEW                  # proposals were accepted: fewer steps than tokens
    batch = dec.generate(PROMPTS, max_new_tokens=NEW)
    assert batch.ids == expected                                           # left-padded batch of 5
    # short matches are padded to the batch's width: the padding is no proposal, so it is never counted as accepted
    assert 0 < batch.stats["acceptance_rate"] <= 1, batch.stats


def test_adaptive_k_exact(artifacts, refs):
    """k_schedule heuristic: each row's k grows after a fully accepted proposal; the output stays exact."""
    dec = dgopt.load(artifacts("llama", strategy={"kind": "ngram", "k": 2, "k_schedule": "heuristic", "k_max": 8}))
    expected = refs("llama")
    res = [dec.generate(p, max_new_tokens=NEW) for p in PROMPTS]
    assert [r.ids[0] for r in res] == expected
    assert max(int(a) for r in res for a in r.stats["accepted_hist"]) > 3     # k grew past its start (2)
    assert dec.generate(PROMPTS, max_new_tokens=NEW).ids == expected
    with pytest.raises(SpecError, match="heuristic ngram proposals vary in length, greedy only"):
        spec_from_dict(tiny_spec("llama", strategy={"kind": "ngram", "k_schedule": "heuristic"},
                                 sampling={"kind": "sample"}))


@pytest.mark.parametrize("strategy", [ONE, MANY], ids=["one_guess", "three_guesses"])
def test_greedy_with_repetition_penalty(strategy, refs, tmp_path):
    spec = tiny_spec("llama", strategy=strategy, sampling={"repetition_penalty": 1.3})
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "a"))
    expected = refs("llama", 1.3)
    assert expected != refs("llama")
    assert [dec.generate(p, max_new_tokens=NEW).ids[0] for p in PROMPTS] == expected
    assert dec.generate(PROMPTS[:4], max_new_tokens=NEW).ids == expected[:4]


@pytest.mark.parametrize("strategy", [ONE, MANY], ids=["one_guess", "three_guesses"])
def test_O0_and_O2_same_tokens_and_steps(strategy, artifacts):
    d0, d2 = dgopt.load(artifacts("gpt2", 0, strategy=strategy)), dgopt.load(artifacts("gpt2", 2, strategy=strategy))
    for batch in ([PROMPTS[0]], PROMPTS[:4]):
        r0, r2 = d0.generate(batch, max_new_tokens=NEW), d2.generate(batch, max_new_tokens=NEW)
        assert r0.ids == r2.ids and r0.stats["steps"] == r2.stats["steps"]
        assert r0.stats["accepted_hist"] == r2.stats["accepted_hist"]


def test_document_raises_tokens_per_step_not_the_output(artifacts, refs):
    dec = dgopt.load(artifacts("llama", strategy=ONE))
    p, ref = PROMPTS[2], refs("llama")[2]
    plain = dec.generate(p, max_new_tokens=NEW)
    dec.document = p + ref                  # the answer itself as the document: nearly every proposal is right
    with_doc = dec.generate(p, max_new_tokens=NEW)
    dec.document = None
    assert plain.ids[0] == with_doc.ids[0] == ref
    assert with_doc.stats["steps"] < plain.stats["steps"], (with_doc.stats, plain.stats)


def test_max_seq_len_respected(artifacts, refs):
    dec = dgopt.load(artifacts("llama", strategy=ONE))
    dec.max_seq_len = 40
    res = dec.generate(PROMPTS[2], max_new_tokens=NEW)
    assert res.ids[0] == refs("llama")[2][:40 - len(PROMPTS[2])] and res.stats["stop"] == ["max_seq_len"]


def test_spec_errors(tmp_path):
    base = tiny_spec("llama")
    for strategy, field in (({"kind": "ngram", "min_ngram": 3, "max_ngram": 2}, "min_ngram 3 exceeds"),
                            ({"kind": "jacobi", "min_ngram": 4, "max_ngram": 3}, "min_ngram 4 exceeds"),
                            ({"kind": "jacobi", "guess": "sometimes"}, "strategy.guess"),
                            ({"kind": "ngram", "guesses": 0}, "guesses >= 1"),
                            ({"kind": "lookahead", "document": "x.txt"}, "document applies to strategy ngram"),
                            ({"kind": "ngram", "document": "missing.txt"}, "strategy.document': file not found"),
                            ({"kind": "ngram", "k": 0}, "strategy.k")):
        with pytest.raises(SpecError, match=field):
            spec_from_dict({**base, "strategy": strategy}, tmp_path)
    assert spec_from_dict({**base, "strategy": {"kind": "ngram"}}).strategy.guesses == 1
    # the plain rolling guess has no index: its n-gram sizes are not read
    spec_from_dict({**base, "strategy": {"kind": "jacobi", "guess": "chain", "min_ngram": 4, "max_ngram": 3}})


SAMPLING = {"kind": "sample", "temperature": 0.8, "top_k": 6}
PROMPT = [5, 17, 42, 99, 5, 17]           # "5 17" occurred before: its continuation 42 99 5 is proposed


@pytest.mark.parametrize("strategy", [{"kind": "ngram", "k": 3}, {"kind": "ngram", "k": 2, "guesses": 2}],
                         ids=["one_guess", "two_guesses"])
def test_sampled_first_token_and_joint(strategy, tmp_path):
    """12,000 draws of two tokens: the proposal (42 99 ...) is a likely enough draw under this model that the match
    path is taken in > 1 % of the steps; first token and joint fit the exact distribution (chi-square)."""
    batch = 500
    dec = dgopt.load(dgopt.compile(tiny_spec("llama", strategy=strategy, sampling=SAMPLING,
                                             target={"max_batch": batch}), tmp_path / "a"))
    first, pairs, hist = {}, {}, {}
    for seed in range(24):
        res = dec.generate([PROMPT] * batch, max_new_tokens=2, seed=seed)
        for a, b in res.ids:
            first[a] = first.get(a, 0) + 1
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
        for k, v in res.stats["accepted_hist"].items():
            hist[int(k)] = hist.get(int(k), 0) + v
    assert sum(v for k, v in hist.items() if k > 1) > 0.01 * sum(hist.values()), hist
    p1, joint = exact_two_tokens(hf_model("llama"), PROMPT, SAMPLING)
    assert chi2_pvalue(first, {i: p for i, p in enumerate(p1) if p > 0}) > 1e-3
    assert chi2_pvalue(pairs, joint) > 1e-3


def test_sampled_seeded_repeatable_and_O0_equals_O2(tmp_path):
    decs = [dgopt.load(dgopt.compile(tiny_spec("llama", strategy=ONE, sampling=SAMPLING), tmp_path / f"o{o}",
                                     opt_level=o)) for o in (0, 2)]
    a = decs[1].generate(PROMPTS[:4], max_new_tokens=24, seed=7)
    assert a.ids == decs[1].generate(PROMPTS[:4], max_new_tokens=24, seed=7).ids == \
        decs[0].generate(PROMPTS[:4], max_new_tokens=24, seed=7).ids
    assert a.ids != decs[1].generate(PROMPTS[:4], max_new_tokens=24, seed=8).ids


def test_compiled_document_on_code_tiny(tmp_path):
    """strategy.document travels in the artifact as text; the runtime searches its tokens too: more tokens per
    step, the same tokens as without it (the document here: an earlier answer to the prompt, as when a user edits
    a file). A random-init model (no tokenizer) cannot take a text document."""
    base = {"model": {"name": "code-tiny"}, "target": {"max_seq_len": 256, "max_batch": 1}}
    plain = dgopt.load(dgopt.compile({**base, "strategy": {"kind": "ngram", "k": 6}}, tmp_path / "plain"))
    prompt = "class Rect:\n    def area(self):\n"
    a = plain.generate(prompt, max_new_tokens=40)
    src = prompt + a.text[0]
    (tmp_path / "doc.py").write_text(src)
    spec = spec_from_dict({**base, "strategy": {"kind": "ngram", "k": 6, "document": "doc.py"}}, tmp_path)
    art = dgopt.compile(spec, tmp_path / "doc")
    assert (art / "document.txt").read_text() == src
    b = dgopt.load(art).generate(prompt, max_new_tokens=40)
    assert a.ids == b.ids
    assert b.stats["steps"] < a.stats["steps"] / 2, (a.stats, b.stats)
    with pytest.raises(SpecError, match="strategy.document': a text document needs a model with a tokenizer"):
        dgopt.compile(spec_from_dict({**tiny_spec("llama"), "strategy": {"kind": "ngram", "document": "doc.py"}},
                                     tmp_path), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_cli_compile_and_run(artifacts, capsys):
    from dgopt.cli import main
    art = artifacts("llama", strategy=ONE)
    assert main(["run", str(art), "--ids", ",".join(map(str, PROMPTS[2])), "--max-new-tokens", "24"]) == 0
    err = capsys.readouterr().err
    assert "ngram" in err and "n-gram proposals:" in err
