"""Repetition penalty with every multi-token strategy: generate applies it at each step to the sequence so far, so
each verified position is penalised by the committed tokens plus the candidate's own prefix
(repetition_penalty_seq). Greedy: token-identical to transformers generate(repetition_penalty=...) for lookahead,
jacobi and speculative (fused and not), batch 1 and 4; the lowered op equals the torch reference."""
import numpy as np
import pytest
import torch

import dgopt
from conftest import PROMPTS, hf_model, noisy_draft_dir, tiny_spec

PENALTY, NEW = 1.8, 40
STRATEGIES = {
    "lookahead": {"kind": "lookahead", "window": 4, "ngram": 3, "guesses": 3},
    "jacobi": {"kind": "jacobi", "block": 4},
    "speculative": {"kind": "speculative", "k": 3},
    "speculative-unfused": {"kind": "speculative", "k": 3, "fused": False},
}


@pytest.fixture(scope="module")
def refs():
    model = hf_model("llama")
    out = []
    for p in PROMPTS[:4]:
        ids = torch.tensor([p])
        with torch.no_grad():
            o = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                               repetition_penalty=PENALTY)
        out.append(o[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_greedy_with_penalty_matches_transformers(name, refs, tmp_path):
    spec = tiny_spec("llama", strategy=STRATEGIES[name], sampling={"kind": "greedy", "repetition_penalty": PENALTY})
    if name.startswith("speculative"):
        spec["draft"] = noisy_draft_dir(tmp_path, "noisy", 0.002)
    dec = dgopt.load(dgopt.compile(spec, tmp_path / name))
    assert "seen" in dec.session.inputs
    for p, ref in zip(PROMPTS[:4], refs):
        assert dec.generate(p, max_new_tokens=NEW).ids[0] == ref
    res = dec.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert res.ids == refs
    if name != "jacobi":            # (a random model's jacobi guesses rarely converge: one token per step)
        assert res.stats["tokens_per_step"] > 1.0              # candidates were accepted under the penalty


def test_penalty_changes_the_output(refs):
    """The references differ from plain greedy: the tests above would catch a penalty that is not applied."""
    model = hf_model("llama")
    from conftest import hf_greedy
    assert any(hf_greedy(model, p, NEW) != r for p, r in zip(PROMPTS[:4], refs))


def test_lowering_equals_reference():
    import onnxruntime as ort
    from dgopt.backends.onnx import lower_to_onnx
    from dgopt.backends.reference import run_graph
    from dgopt.ir import Graph
    B, k, G, K, V = 3, 2, 2, 3, 11
    g = Graph()
    x = g.add("input", attrs={"name": "logits_seq", "type": "logits_seq"}, id="x")
    s = g.add("input", attrs={"name": "seen", "type": "seen"}, id="seen")
    c = g.add("input", attrs={"name": "candidates", "type": "candidates"}, id="c")
    g.set_output("out", g.add("repetition_penalty_seq", [x, s, c], {"penalty": 1.5}, id="pen"))
    rng = np.random.default_rng(0)
    feeds = {"logits_seq": rng.normal(size=(B, k + G * K, V)).astype(np.float32),
             "seen": (rng.random((B, V)) < 0.3).astype(np.float32),
             "candidates": rng.integers(0, V, (B, G, K))}
    model, _ = lower_to_onnx(g, {}, vocab_size=V)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ref = run_graph(g, {n: torch.from_numpy(v) for n, v in feeds.items()})["out"].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # by hand, one verified position: row 0, guess 1, token 2 sees `seen` plus that guess's tokens 0..2
    row = k + 1 * K + 2
    s = feeds["seen"][0].copy()
    s[feeds["candidates"][0, 1, :3]] = 1
    x0 = feeds["logits_seq"][0, row]
    np.testing.assert_allclose(got[0, row], np.where(s > 0, np.where(x0 > 0, x0 / 1.5, x0 * 1.5), x0), rtol=1e-6)
    np.testing.assert_array_equal(got[:, :k - 1], feeds["logits_seq"][:, :k - 1])      # unread x rows untouched
