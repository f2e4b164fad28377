"""The in-graph sampler draws from the exact categorical distribution (chi-square, fixed seeds, 20,000 draws).
The expected distribution comes from the reference interpreter, which runs Hugging Face's own logits warpers."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy.stats import chisquare

import dgopt
from dgopt.backends.onnx import lower_to_onnx
from dgopt.backends.reference import exact_probs
from dgopt.ir import Graph
from dgopt.passes import EliminateDeadNodes, FuseGumbelSampling
from dgopt.passmgr import PassManager, VerifyInstrument
from dgopt.spec import SamplingSpec
from dgopt.strategies.autoregressive import add_sampler
from conftest import hf_model

V, N = 40, 20_000
CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.08),
    "top_k+top_p": dict(temperature=1.3, top_k=12, top_p=0.85),
    "repetition_penalty": dict(repetition_penalty=1.7, temperature=0.9),
}


def sampler(noise="precomputed", fused=False, **kw):
    g = Graph()
    x = g.add("input", attrs={"name": "logits", "type": "logits"}, id="logits")
    g.set_output("next_token", add_sampler(g, x, SamplingSpec(kind="sample", noise=noise, **kw)))
    if fused:
        g = PassManager([FuseGumbelSampling(), EliminateDeadNodes()], [VerifyInstrument()])(g).graph
        assert "gumbel_argmax" in g.ops() and "multinomial" not in g.ops() and "softmax" not in g.ops()
    return g


def logits_row(seed=0):
    return np.random.default_rng(seed).normal(size=(1, V)).astype(np.float32) * 2


def draw(g, logits, seen=None, seed=0):
    model, io = lower_to_onnx(g, {}, vocab_size=V)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"logits": np.repeat(logits, N, 0)}
    names = {i["name"] for i in io["inputs"]}
    if "uniform" in names:
        feeds["uniform"] = np.random.default_rng(seed).random(N, dtype=np.float32)
    if "gumbel" in names:
        feeds["gumbel"] = -np.log(-np.log(np.random.default_rng(seed).random((N, V), dtype=np.float32)))
    if "seen" in names:
        feeds["seen"] = np.repeat(seen, N, 0)
    return sess.run(["next_token"], feeds)[0]


def expected(g, logits, seen=None):
    feeds = {"seen": torch.from_numpy(seen)} if seen is not None else {}
    return exact_probs(g, torch.from_numpy(logits), feeds)[0].double().numpy()


def check(samples, p):
    counts = np.bincount(samples, minlength=V)
    assert counts[p == 0].sum() == 0, "sampled a token the processors removed"
    keep = p > 0
    return chisquare(counts[keep], p[keep] / p[keep].sum() * len(samples)).pvalue


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "gumbel"])
@pytest.mark.parametrize("noise", ["precomputed", "in_graph"])
@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_exact_distribution(case, noise, fused):
    g = sampler(noise, fused, **CASES[case])
    logits = logits_row(seed=len(case))
    seen = None
    if "repetition_penalty" in CASES[case]:
        seen = (np.arange(V) % 3 == 0).astype(np.float32)[None]
    p = expected(sampler(noise, False, **CASES[case]), logits, seen)    # exact: HF warpers + softmax
    assert (p > 0).sum() > 2                           # the case really is a distribution, not a point mass
    assert check(draw(g, logits, seen), p) > 1e-3


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "gumbel"])
def test_chi_square_rejects_a_wrong_distribution(fused):
    """The test above can fail: samples at temperature 0.7 do not pass as samples at temperature 1.0."""
    logits = logits_row(seed=3)
    samples = draw(sampler(temperature=0.7, fused=fused), logits)
    assert check(samples, expected(sampler(temperature=1.0), logits)) < 1e-6


def test_fuse_gumbel_structure():
    before = sampler("precomputed", temperature=0.5, top_k=4)
    after = sampler("precomputed", True, temperature=0.5, top_k=4)
    assert [n.op for n in before.topo_order()] == ["input", "temperature", "top_k", "softmax", "input", "multinomial"]
    assert [n.op for n in after.topo_order()] == ["input", "temperature", "top_k", "input", "gumbel_argmax"]
    assert after.node("sampler/gumbel_argmax").inputs[0].node == "sampler/top_k"     # noise over kept logits
    assert after.node("gumbel").attrs == {"name": "gumbel", "type": "gumbel"}
    assert after.node("sampler/gumbel_argmax").meta["created_by"] == "fuse_gumbel_sampling"
    ig = sampler("in_graph", True, seed=9)
    assert [n.op for n in ig.topo_order()] == ["input", "random_gumbel", "gumbel_argmax"]
    assert ig.node("sampler/random_gumbel").attrs["seed"] == 9


def test_fuse_gumbel_leaves_a_shared_softmax_alone():
    """A speculative draft's softmax is also its q for verification: fusing would keep the softmax and only trade a
    [B] uniform for [B, V] noise, so the pass leaves it."""
    g = sampler("precomputed", temperature=0.5)
    sm = g.find("softmax")[0]
    g.set_output("q", g.add("as_seq", [sm.out()], id="q"))
    assert not FuseGumbelSampling()(g).modified


def test_fuse_gumbel_leaves_greedy_alone():
    g = Graph()
    x = g.add("input", attrs={"name": "logits", "type": "logits"}, id="logits")
    g.set_output("next_token", add_sampler(g, x, SamplingSpec(kind="greedy")))
    assert not FuseGumbelSampling()(g).modified


@pytest.mark.parametrize("noise", ["precomputed", "in_graph"])
def test_artifact_O2_is_fused_and_O0_is_not(noise, artifacts):
    sampling = {"kind": "sample", "top_p": 0.9, "noise": noise}
    d0, d2 = dgopt.load(artifacts("llama", 0, sampling=sampling)), dgopt.load(artifacts("llama", 2, sampling=sampling))
    ops = lambda d: {n.op_type for n in __import__("onnx").load(str(d.path / "step.onnx")).graph.node
                     if n.name.startswith("sampler/")}
    assert "ArgMax" in ops(d2) and "CumSum" in ops(d0) and "CumSum" in ops(d2)    # top-p keeps its CumSum
    assert ("gumbel" in d2.session.inputs) == (noise == "precomputed")
    assert "gumbel" not in d0.session.inputs


@pytest.mark.parametrize("opt_level, noise", [(0, "precomputed"), (2, "precomputed"), (2, "in_graph")])
def test_artifact_first_token_distribution(opt_level, noise, artifacts):
    """The whole compiled step (model forward + processors + sampler) vs softmax of HF-processed torch logits."""
    spec = dict(sampling={"kind": "sample", "temperature": 0.8, "top_k": 20, "seed": 7, "noise": noise},
                target={"max_batch": N, "max_seq_len": 256})
    dec = dgopt.load(artifacts("llama", opt_level, **spec))
    prompt = [5, 17, 42]
    res = dec.generate([prompt] * N, max_new_tokens=1)
    samples = np.array([r[0] for r in res.ids])
    with torch.no_grad():
        logits = hf_model("llama")(torch.tensor([prompt])).logits[:, -1]
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper
    p = torch.softmax(TopKLogitsWarper(20)(None, TemperatureLogitsWarper(0.8)(None, logits)), -1)[0].double().numpy()
    counts = np.bincount(samples, minlength=len(p))
    assert counts[p == 0].sum() == 0
    assert chisquare(counts[p > 0], p[p > 0] / p[p > 0].sum() * N).pvalue > 1e-3


def test_seeded_sampling_is_reproducible(artifacts):
    dec = dgopt.load(artifacts("gpt2", sampling={"kind": "sample", "temperature": 1.5, "seed": 11}))
    a = dec.generate([[1, 2, 3], [4, 5]], max_new_tokens=32).ids
    assert dec.generate([[1, 2, 3], [4, 5]], max_new_tokens=32).ids == a
    assert dgopt.load(dec.path).generate([[1, 2, 3], [4, 5]], max_new_tokens=32).ids == a
    assert dec.generate([[1, 2, 3], [4, 5]], max_new_tokens=32, seed=12).ids != a


def test_in_graph_noise_reproducible_per_load(artifacts):
    path = artifacts("llama", sampling={"kind": "sample", "noise": "in_graph", "seed": 5})
    assert "uniform" not in dgopt.load(path).session.inputs
    a = dgopt.load(path).generate([1, 2, 3], max_new_tokens=24).ids
    assert dgopt.load(path).generate([1, 2, 3], max_new_tokens=24).ids == a
