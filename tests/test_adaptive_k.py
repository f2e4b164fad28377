"""Speculative decoding with transformers' heuristic k (strategy.k_schedule heuristic): the draft chain is one
draft_loop node (an ONNX Loop whose trip count the host sets per step, k + 2 after a step that accepted every
proposal, else k - 1). Greedy output token-identical to target-only transformers generate, whatever k does; the
loop equals the unrolled chain of a fixed k and the reference interpreter."""
import numpy as np
import pytest
import torch
import yaml

import dgopt
from conftest import PROMPTS, TINY, hf_greedy, hf_model, noisy_draft_dir, random_past, tiny_spec
from dgopt.errors import DgoptError

NEW = 48
WEAK = {"config": {**TINY["llama"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "num_key_value_heads": 1}, "seed": 3}


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")
    return {"noisy": noisy_draft_dir(root, "noisy", 0.002), "same": {"config": dict(TINY["llama"]), "seed": 0},
            "weak": WEAK, "smaller-vocab": {"config": {**TINY["gpt2"], "vocab_size": 200}, "seed": 2}}


@pytest.fixture(scope="module")
def refs():
    m = hf_model("llama")
    return [hf_greedy(m, p, NEW) for p in PROMPTS]


def compile_adaptive(tmp_path, draft, k=2, k_max=6, opt_level=2, fused=True, **sampling):
    spec = tiny_spec("llama", strategy={"kind": "speculative", "k": k, "k_schedule": "heuristic", "k_max": k_max,
                                        "fused": fused}, sampling={"kind": "greedy", **sampling})
    spec["draft"] = draft
    return dgopt.load(dgopt.compile(spec, tmp_path / f"adaptive-{k}-{k_max}-{opt_level}-{fused}",
                                    opt_level=opt_level))


@pytest.mark.parametrize("name,fused", [("noisy", True), ("same", True), ("weak", True), ("smaller-vocab", True),
                                        ("noisy", False), ("same", False), ("smaller-vocab", False)])
def test_heuristic_greedy_exact_batch1_and_batch4(name, fused, drafts, refs, tmp_path):
    """fused: the draft_loop is in the step; unfused: in draft.onnx (its own single-threaded session), the step
    verifies the k proposals it is given (length -1)."""
    dec = compile_adaptive(tmp_path, drafts[name], fused=fused)
    assert "draft_k" in (dec.session if fused else dec.draft_session).inputs
    ks = []
    for p, ref in zip(PROMPTS, refs):
        res = dec.generate(p, max_new_tokens=NEW)
        assert res.ids[0] == ref
        ks.append(res.stats["mean_k"])
    batch = dec.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert batch.ids == refs[:4]
    if name == "same":      # every proposal accepted: k climbs from 2 to k_max (2, 4, 6, 6, ...)
        assert min(ks) > 4.5 and batch.stats["acceptance_rate"] == 1.0
    if name == "weak":      # almost nothing accepted: k falls to 1 and stays there
        assert max(ks) < 1.6
    if name == "noisy":     # in between, and it moves
        assert 1.6 < np.mean(ks) < 5.5 and len(set(ks)) > 1


def test_heuristic_with_repetition_penalty(drafts, tmp_path):
    """The loop carries `seen`: the draft proposes under the penalty, the output equals generate's with it."""
    dec = compile_adaptive(tmp_path, drafts["noisy"], repetition_penalty=1.5)
    ops = [n["op"] for n in yaml.safe_load((dec.path / "ir.yaml").read_text())["graph"]["nodes"]]
    assert "draft_loop" in ops and "mark_seen" not in ops        # the penalty's state lives in the loop
    model = hf_model("llama")
    res = dec.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert res.ids == [hf_greedy(model, p, NEW, repetition_penalty=1.5) for p in PROMPTS[:4]]
    per_prompt = [dec.generate(p, max_new_tokens=NEW).stats["tokens_per_step"] for p in PROMPTS]
    assert np.mean(per_prompt) > 2.3, per_prompt      # a draft blind to the penalty: ~1.7 (test_penalty_multitoken)


def test_loop_equals_unrolled_chain_and_reference(drafts, tmp_path):
    """At draft_k = k the loop's step gives what the constant-k step (k chained forwards) gives, output for output,
    and the lowered loop what the reference interpreter's loop gives; -O0 and -O2 decode alike."""
    from dgopt.backends.reference import run_graph
    from dgopt.ir import graph_from_dict
    from dgopt.models.hf import load_model
    from dgopt.spec import spec_from_dict
    adaptive = compile_adaptive(tmp_path, drafts["noisy"], k=3)
    spec = tiny_spec("llama", strategy={"kind": "speculative", "k": 3})
    spec["draft"] = drafts["noisy"]
    fixed = dgopt.load(dgopt.compile(spec, tmp_path / "fixed"))
    B, P, q = 2, 6, 2
    r = np.random.default_rng(0)
    feeds = {"draft_ids": r.integers(0, 320, (B, q)), "draft_position_ids": np.arange(P, P + q)[None].repeat(B, 0),
             "draft_mask": np.zeros((B, 1, q, P + q), np.float32), "x_ids": r.integers(0, 320, (B, 1))}
    feeds["draft_mask"][:, :, 0, -1] = np.finfo(np.float32).min          # causal inside the block

    def verify_inputs(k):       # x and k proposals after the target's past of P
        m = np.zeros((B, 1, k + 1, P + k + 1), np.float32)
        m[:, :, :, P:] = np.where(np.tril(np.ones((k + 1, k + 1))) > 0, 0, np.finfo(np.float32).min)
        return {"verify_position_ids": np.arange(P + q - 1, P + q + k)[None].repeat(B, 0), "verify_mask": m}
    feeds.update(verify_inputs(3))
    for s in (fixed.session, adaptive.session):
        feeds.update(random_past(s, B, P, r))
    def run(s, extra):
        return s.sess.run(None, {**{i.name: feeds[i.name] for i in s.sess.get_inputs() if i.name in feeds}, **extra})

    names = [o.name for o in adaptive.session.sess.get_outputs()]
    a = dict(zip(names, run(adaptive.session, {"draft_k": np.array(3, np.int64)})))
    f = dict(zip([o.name for o in fixed.session.sess.get_outputs()], run(fixed.session, {})))
    for n in names:
        np.testing.assert_allclose(a[n], f[n], rtol=0, atol=1e-5, err_msg=n)
    assert a["proposals"].shape == (B, 3)
    # the reference interpreter runs the IR's draft_loop with transformers' own forwards
    g = graph_from_dict(yaml.safe_load((adaptive.path / "ir.yaml").read_text())["graph"])
    models = {"target": load_model(spec_from_dict(tiny_spec("llama")).model, lambda p: p),
              "draft": load_model(spec_from_dict({"model": drafts["noisy"]}).model, lambda p: p)}
    tfeeds = {n: torch.from_numpy(v) for n, v in feeds.items() if not n.startswith(("past", "draft_past"))}
    tfeeds["past"] = [torch.from_numpy(feeds[t]) for t in adaptive.session.past["tensors"][:4]]
    tfeeds["draft_past"] = [torch.from_numpy(feeds[t]) for t in adaptive.session.past["tensors"][4:]]
    for k in (1, 3, 5):
        vk = verify_inputs(k)
        ref = run_graph(g, {**tfeeds, **{n: torch.from_numpy(v) for n, v in vk.items()}, "draft_k": torch.tensor(k)},
                        models)
        got = dict(zip(names, run(adaptive.session, {**vk, "draft_k": np.array(k, np.int64)})))
        assert got["proposals"].tolist() == ref["proposals"].tolist()
        assert got["accept_len"].tolist() == ref["accept_len"].tolist()
        np.testing.assert_allclose(got["draft_present.0.key"], ref["draft_present"][0].numpy(), atol=1e-5)
    o0 = compile_adaptive(tmp_path, drafts["noisy"], opt_level=0)
    assert o0.generate(PROMPTS[:4], max_new_tokens=NEW).ids == \
        compile_adaptive(tmp_path, drafts["noisy"]).generate(PROMPTS[:4], max_new_tokens=NEW).ids


def test_heuristic_dump_is_a_valid_spec(drafts, refs, tmp_path):
    """ir.yaml holds the draft_loop node: compiling it gives the same artifact's behaviour."""
    dec = compile_adaptive(tmp_path, drafts["noisy"])
    d = yaml.safe_load((dec.path / "ir.yaml").read_text())
    d["draft"] = drafts["noisy"]
    again = dgopt.load(dgopt.compile(d, tmp_path / "again"))
    assert again.generate(PROMPTS[:4], max_new_tokens=NEW).ids == refs[:4]


@pytest.mark.parametrize("strategy,sampling,match", [
    ({"kind": "speculative", "k_schedule": "heuristic"}, {"kind": "sample"}, "k_schedule': heuristic runs the draft"),
    ({"kind": "jacobi", "k_schedule": "heuristic"}, {}, "k_schedule heuristic needs strategy speculative, uag, recycle"),
    ({"kind": "speculative", "k": 9, "k_schedule": "heuristic", "k_max": 8}, {}, "k 9 exceeds k_max 8"),
])
def test_heuristic_bad_specs(strategy, sampling, match, drafts, tmp_path):
    spec = tiny_spec("llama", strategy=strategy, sampling=sampling)
    spec["draft"] = drafts["noisy"]
    with pytest.raises(DgoptError, match=match):
        dgopt.compile(spec, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name,fused", [("same", True), ("noisy", True), ("same", False)])
def test_heuristic_k_shrinks_to_fit_max_seq_len(name, fused, drafts, tmp_path):
    """No positions are held back for k_max: near target.max_seq_len the loop clamps positions (only candidates
    whose tokens are dropped see them), so the heuristic generates exactly as many tokens as autoregressive decoding
    (max_seq_len - prompt, per row), the same ones, one prompt and a batch. ("same" climbs to k_max and meets the
    limit there.)"""
    spec = tiny_spec("llama", strategy={"kind": "speculative", "k": 2, "k_schedule": "heuristic", "k_max": 6,
                                        "fused": fused}, target={"max_seq_len": 40})
    spec["draft"] = drafts[name]
    dec = dgopt.load(dgopt.compile(spec, tmp_path / f"fit-{name}-{fused}"))
    top = []                                    # the highest position any call was given
    for sess in (dec.session, dec.draft_session):
        if sess is not None:
            def run(feeds, cache, _run=sess.run):
                top.append(max(int(v.max()) for n, v in feeds.items() if n.endswith("position_ids")))
                return _run(feeds, cache)
            sess.run = run
    m = hf_model("llama")
    for p in PROMPTS[:3]:
        res = dec.generate(p, max_new_tokens=100)
        assert len(res.ids[0]) == 40 - len(p) and res.stats["stop"] == ["max_seq_len"], res.stats
        assert res.ids[0] == hf_greedy(m, p, 40 - len(p))
    batch = dec.generate(PROMPTS[:4], max_new_tokens=100)              # each row its own budget
    assert [len(r) for r in batch.ids] == [40 - len(p) for p in PROMPTS[:4]]
    assert batch.ids == [hf_greedy(m, p, 40 - len(p)) for p in PROMPTS[:4]]
    assert max(top) == 39                       # up to the limit, never past it
