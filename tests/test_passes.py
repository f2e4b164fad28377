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
