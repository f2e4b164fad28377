"""Each pass: a structural before/after check and a numerical check (reference interpreter and lowered ONNX)."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from dgopt.backends.onnx import lower_to_onnx
from dgopt.backends.reference import run_graph
from dgopt.ir import Graph, verify
from dgopt.passes import EliminateDeadNodes, EliminateSoftmaxBeforeArgmax
from dgopt.passmgr import PassManager, VerifyInstrument
from dgopt.errors import PassError

V = 97


def greedy_sampler():
    g = Graph()
    x = g.add("input", attrs={"name": "logits", "type": "logits"}, id="logits")
    r = g.add("repetition_penalty", [x, g.add("input", attrs={"name": "seen", "type": "seen"}, id="seen")],
              {"penalty": 1.5})
    s = g.add("softmax", [r])
    g.set_output("next_token", g.add("argmax", [s]))
    return g


def run_onnx(g, feeds):
    model, _ = lower_to_onnx(g, {}, vocab_size=V)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def feeds(rows=512, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, V)).astype(np.float32) * 3
    seen = (rng.random((rows, V)) < 0.2).astype(np.float32)
    logits[:8] = 0.5         # all-equal rows: argmax must keep the first index, with softmax or without
    seen[:8] = 0
    return {"logits": logits, "seen": seen}


def test_eliminate_softmax_before_argmax_structure():
    g = greedy_sampler()
    res = EliminateSoftmaxBeforeArgmax()(g)
    assert res.modified
    assert g.ops() == ["input", "input", "repetition_penalty", "softmax", "argmax"]      # input untouched
    assert res.graph.node("argmax").inputs[0].node == "repetition_penalty"
    assert res.graph.node("argmax").meta["created_by"] == "eliminate_softmax_before_argmax"
    assert not EliminateSoftmaxBeforeArgmax()(res.graph).modified                          # idempotent


def test_eliminate_softmax_before_argmax_numerics():
    g = greedy_sampler()
    after = EliminateDeadNodes()(EliminateSoftmaxBeforeArgmax()(g).graph).graph
    f = feeds()
    tf = {k: torch.from_numpy(v) for k, v in f.items()}
    ref_before = run_graph(g, tf)["next_token"].numpy()
    ref_after = run_graph(after, tf)["next_token"].numpy()
    onnx_before = run_onnx(g, f)["next_token"]
    onnx_after = run_onnx(after, f)["next_token"]
    assert (ref_before == ref_after).all() and (onnx_before == onnx_after).all()
    assert (onnx_after == ref_after).all()
    assert (onnx_after[:8] == 0).all() and (onnx_before[:8] == 0).all()


def test_eliminate_dead_nodes_structure():
    g = greedy_sampler()
    g.add("softmax", [g.node("logits")], id="unused")                        # dead
    g.add("random_uniform", [g.node("logits")], id="noise")                   # impure: kept
    res = EliminateDeadNodes()(EliminateSoftmaxBeforeArgmax()(g).graph)
    assert res.modified
    ids = {n.id for n in res.graph.nodes()}
    assert "unused" not in ids and "softmax" not in ids and "noise" in ids
    verify(res.graph)
    assert not EliminateDeadNodes()(res.graph).modified


def test_eliminate_dead_nodes_drops_unused_inputs_and_keeps_outputs_equal():
    g = greedy_sampler()
    g.add("input", attrs={"name": "extra", "type": "uniform"}, id="extra")
    after = EliminateDeadNodes()(g).graph
    assert "extra" not in after and "seen" in after
    f = feeds(seed=1)
    assert (run_onnx(g, {**f, "extra": np.zeros(len(f["logits"]), np.float32)})["next_token"]
            == run_onnx(after, f)["next_token"]).all()


def test_pass_manager_names_failing_pass():
    class Breaks(EliminateDeadNodes):
        name = "breaks_things"

        def call(self, g):
            g.node("argmax").attrs["bogus"] = 1
            return True
    pm = PassManager([EliminateSoftmaxBeforeArgmax(), Breaks()], [VerifyInstrument()])
    with pytest.raises(PassError, match="after pass 'breaks_things'"):
        pm(greedy_sampler())


def test_pass_does_not_mutate_its_input():
    g = greedy_sampler()
    fp = g.fingerprint()
    EliminateDeadNodes()(EliminateSoftmaxBeforeArgmax()(g).graph)
    assert g.fingerprint() == fp


def _draft_sampler(k=10, temperature=0.7, with_verify=True):
    """A sampled draft's pick: multinomial(softmax(top_k(x / T))), its q read by verify_sample (as the fused
    speculative step does) or, with_verify False, returned as an output."""
    g = Graph()
    x = g.add("input", attrs={"name": "logits", "type": "logits"}, id="logits")
    u = g.add("input", attrs={"name": "u", "type": "uniform"}, id="u")
    t = g.add("temperature", [x], {"value": temperature}, id="draft0/temperature")
    sm = g.add("softmax", [g.add("top_k", [t], {"k": k}, id="draft0/top_k")], id="draft0/softmax")
    tok = g.add("multinomial", [sm, u], id="draft0/multinomial")
    g.set_output("token", tok)
    if with_verify:
        q = g.add("as_seq", [sm], id="draft0/q")
        vl = g.add("input", attrs={"name": "verify_logits", "type": "logits"}, id="verify_logits")
        cands = g.add("to_candidates", [g.add("input", attrs={"name": "d", "type": "tokens"}, id="d")])
        us = g.add("input", attrs={"name": "accept_uniform", "type": "uniform_seq"}, id="accept_uniform")
        v = g.add("verify_sample", [vl, cands.out("candidates"), q, us], {"length": 1}, id="verify/accept")
        g.set_output("accept_len", v.out("accept_len"))
    else:
        g.set_output("q", sm)
    return g


def test_fuse_draft_top_k_sampling_structure():
    from dgopt.passes import FuseDraftTopKSampling
    g = _draft_sampler()
    res = FuseDraftTopKSampling()(g)
    assert res.modified
    verify(res.graph)
    after = EliminateDeadNodes()(res.graph).graph
    assert not {"multinomial", "softmax", "top_k", "temperature"} & set(after.ops())
    fused = after.find("sample_top_k")
    assert len(fused) == 1 and fused[0].attrs == {"k": 10, "temperature": 0.7}
    assert after.node("draft0/q").inputs[0] == fused[0].out("probs")
    assert not FuseDraftTopKSampling()(res.graph).modified                               # idempotent
    # q that is not only a draft's proposal distribution (here: an output) stays exact per draw: no rewrite
    assert not FuseDraftTopKSampling()(_draft_sampler(with_verify=False)).modified


def test_fuse_draft_top_k_sampling_in_the_pipeline():
    """Every proposal of a sampled fused speculative step is rewritten, and of a sampled recycle chain (whose q is
    the output proposal_probs, the next step's draft_probs); the target's own sampler, and a draft whose chain ends
    in top_p, are not."""
    from dgopt.pipeline import build_ir, optimize
    from dgopt.spec import spec_from_dict
    from conftest import tiny_spec

    def ops(strategy, sampling, draft=True):
        spec = tiny_spec(strategy=strategy, sampling={"kind": "sample", **sampling})
        if strategy["kind"] == "recycle":
            spec["recycle"], draft = {"path": "module-dir"}, False      # (read at compile, not by the passes)
        if draft:
            spec["draft"] = {"config": spec["model"]["config"], "seed": 1}
        s = spec_from_dict(spec)
        return optimize(build_ir(s), s)[0].ops()
    o = ops({"kind": "speculative", "k": 3}, {"temperature": 0.8, "top_k": 6})
    assert o.count("sample_top_k") == 3 and "multinomial" not in o and "top_k" in o     # top_k: the verifier's
    assert "sample_top_k" not in ops({"kind": "speculative", "k": 3}, {"top_k": 6, "top_p": 0.9})
    assert "sample_top_k" not in ops({"kind": "autoregressive"}, {"top_k": 6}, draft=False)
    o = ops({"kind": "recycle", "k": 3}, {"temperature": 0.8, "top_k": 6})
    assert o.count("sample_top_k") == 3 and "multinomial" not in o
    assert "sample_top_k" not in ops({"kind": "recycle", "k": 3}, {"top_k": 6, "top_p": 0.9})


def test_fuse_draft_top_k_sampling_numerics():
    """q equals the unfused softmax(top_k(x / T)) (reference and ONNX, rows with -inf scores); the lowered op's draws
    equal the reference's; and over a grid of N uniforms each token is drawn N * q times (+-1): a draw from q."""
    g = _draft_sampler(with_verify=False)
    after = Graph()                                      # what the pass puts in its place
    f = after.add("sample_top_k", [after.add("input", attrs={"name": "logits", "type": "logits"}),
                                   after.add("input", attrs={"name": "u", "type": "uniform"})],
                  {"k": 10, "temperature": 0.7})
    after.set_output("token", f.out("token"))
    after.set_output("q", f.out("probs"))
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, V)) * 3).astype(np.float32)
    x[:4, :V // 2] = -np.inf                             # a draft lacking ids (to_target_vocab's fill)
    x[5:7, 5:] = -np.inf                                 # fewer finite scores than k: -inf among the kept ten
    u = rng.random(64).astype(np.float32)
    ref_q = run_graph(g, {"logits": torch.from_numpy(x), "u": torch.from_numpy(u)})["q"].numpy()
    onnx_q = run_onnx(g, {"logits": x, "u": u})["q"]
    ref = run_graph(after, {"logits": torch.from_numpy(x), "u": torch.from_numpy(u)})
    got = run_onnx(after, {"logits": x, "u": u})
    np.testing.assert_allclose(ref["q"].numpy(), ref_q, atol=1e-6)
    np.testing.assert_allclose(got["q"], onnx_q, atol=1e-6)
    assert not np.isnan(got["q"]).any() and np.allclose(got["q"].sum(-1), 1.0, atol=1e-5)
    assert (got["q"][np.arange(64), got["token"]] > 0).all()
    assert (got["token"] == ref["token"].numpy()).all()
    N = 4000
    row = np.repeat(x[4:5], N, 0)
    grid = ((np.arange(N) + 0.5) / N).astype(np.float32)
    counts = np.bincount(run_onnx(after, {"logits": row, "u": grid})["token"], minlength=V)
    assert (np.abs(counts - N * got["q"][4]) <= 1.0 + 1e-3 * N).all(), (counts, N * got["q"][4])


def test_fuse_recycle_chain_structure():
    """The greedy chain of a recycle step (k recycle_step -> argmax, collected by as_seq / concat_seq) becomes one
    recycle_chain node fed by the chain's start; a sampled chain, or one whose inner scores something else reads,
    stays as it is. (Numerics: tests/test_recycle.py runs -O0 against -O2 and the lowered step against the
    reference interpreter.)"""
    from dgopt.passes import EliminateDeadNodes, FuseRecycleChain
    from dgopt.pipeline import build_ir
    from dgopt.spec import spec_from_dict
    from conftest import tiny_spec

    def ir(k=3, **sampling):
        spec = tiny_spec(strategy={"kind": "recycle", "k": k}, recycle={"path": "unused"},
                         sampling=sampling or {"kind": "greedy"})
        return EliminateSoftmaxBeforeArgmax()(build_ir(spec_from_dict(spec))).graph
    g = ir()
    res = FuseRecycleChain()(g)
    assert res.modified
    after = EliminateDeadNodes()(res.graph).graph
    verify(after)
    (chain,) = after.find("recycle_chain")
    assert chain.attrs == {"module": "recycle", "length": 3} and "recycle_step" not in after.ops()
    start = after.node("recycle/start")
    assert chain.inputs == (start.out("hidden"), start.out("token"))
    assert after.outputs["proposals"] == chain.out("proposals")
    assert not FuseRecycleChain()(after).modified                                       # idempotent
    g = ir()
    g.set_output("scores", g.node("recycle1").out("logits"))     # an inner step's scores read elsewhere
    assert not FuseRecycleChain()(g).modified
    assert not FuseRecycleChain()(ir(kind="sample", temperature=0.8)).modified
    assert FuseRecycleChain()(ir(k=1)).modified
