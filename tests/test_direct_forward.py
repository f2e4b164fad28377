"""The directly written Llama / Qwen2 forward (dgopt/models/direct.py), plain and with onnxruntime contrib ops, against
the traced export and transformers: GQA, biases, rope scalings, Qwen2's sliding window."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import dgopt
from conftest import PROMPTS, TINY, hf_greedy, tiny_spec
from dgopt.errors import DgoptError
from dgopt.models.hf import _finish, config_model, export_forward

VARIANTS = {     # configs the writer must get right: GQA, biases, a head_dim of its own, static rope scalings
    "llama-gqa": TINY["llama"],
    "qwen2-bias": TINY["qwen2"],
    "llama-mha-biases": {**TINY["llama"], "num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    "llama-head-dim": {**TINY["llama"], "head_dim": 24},
    "llama-rope-linear": {**TINY["llama"], "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 10000.0}},
    "llama-rope-llama3": {**TINY["llama"], "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 10000.0}},
    "llama-rope-yarn": {**TINY["llama"], "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 64,
                                                             "rope_theta": 10000.0}},
    # layer 0 full, layer 1 sliding (transformers: from max_window_layers on); the feeds' past is longer than 4
    "qwen2-sliding": {**TINY["qwen2"], "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
}


def _lm(cfg, seed=0):
    cfg = dict(cfg)
    model = config_model(cfg, seed)
    with torch.no_grad():     # random-init biases are zero: make them count
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    return _finish(model, cfg["family"], "test", None)


def _session(proto):
    o = ort.SessionOptions()
    o.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), o, providers=["CPUExecutionProvider"])


def _feeds(lm, B, P, q, seed=0):
    """A ragged batch: row b has b left-padding slots masked out of the past; positions continue from the past."""
    r = np.random.default_rng(seed)
    info = lm.info
    valid = np.ones((B, P + q), bool)
    for b in range(B):
        valid[b, :min(b, P)] = False
    causal = np.arange(P + q)[None, :] <= (P + np.arange(q))[:, None]
    mask = np.where(causal[None] & valid[:, None], 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    f = {"input_ids": r.integers(0, info["vocab_size"], (B, q)),
         "position_ids": np.arange(P, P + q)[None].repeat(B, 0) + 37 * np.arange(B)[:, None],
         "attn_mask": mask}
    for i in range(info["num_layers"]):
        for kv in ("key", "value"):
            f[f"past.{i}.{kv}"] = r.standard_normal((B, info["num_kv_heads"], P, info["head_dim"])).astype(np.float32)
    return f


@pytest.mark.parametrize("method,variant", [(m, v) for m in ("direct", "contrib") for v in VARIANTS])
def test_direct_forward_equals_traced_export(method, variant):
    """Same logits and KV as torch.onnx.export of the transformers forward, at prefill (past 0), q 1 and q 5, on a
    ragged batch (left padding masked out of the past)."""
    lm = _lm(VARIANTS[variant])
    direct = export_forward(lm, method=method)
    assert lm.info["forward"] == method
    assert any(n.domain == "com.microsoft" for n in direct.graph.node) == (method == "contrib")
    traced = export_forward(lm, method="traced")
    assert lm.info["forward"] == "traced"
    sd, st = _session(direct), _session(traced)
    assert [i.name for i in sd.get_inputs()] == [i.name for i in st.get_inputs()]
    assert [o.name for o in sd.get_outputs()] == [o.name for o in st.get_outputs()]
    for B, P, q in ((2, 0, 7), (1, 9, 1), (3, 12, 5)):
        f = _feeds(lm, B, P, q)
        a, b = sd.run(None, f), st.run(None, f)
        for x, y, o in zip(a, b, sd.get_outputs()):
            assert x.shape == y.shape, o.name
            np.testing.assert_allclose(x, y, rtol=0, atol=2e-5, err_msg=f"{variant} {o.name} B{B} P{P} q{q}")
        assert (a[0].argmax(-1) == b[0].argmax(-1)).all()


def test_contrib_forward_writes_grouped_query_attention():
    """GQA on contrib: one MultiHeadAttention over the kv heads per layer, the query heads of a kv head folded into
    its sequence (the cache stays [B, Hkv, T, D]); auto takes it where contrib ops are allowed (faster than direct
    on GQA models: benchmarks/forward_gqa.py, docs/readme/models.md)."""
    lm = _lm(TINY["llama"])
    proto = export_forward(lm, method="auto", contrib_ok=True)
    assert lm.info["forward"] == "contrib"
    mha = [n for n in proto.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 2 and all(a.i == TINY["llama"]["num_key_value_heads"] for n in mha for a in n.attribute
                                 if a.name == "num_heads")
    assert sum(n.op_type == "Tile" for n in proto.graph.node) == 1      # the mask, once per forward


def test_direct_forward_is_small():
    """The point of it: no shape bookkeeping, and under half the traced export's kernels after onnxruntime's own
    fusions (which still apply: RMSNorm becomes SimplifiedLayerNormalization, SiLU QuickGelu); with contrib ops
    under half again (per layer: two skip-norms, two rotaries, one attention kernel)."""
    lm = _lm(VARIANTS["llama-mha-biases"])
    counts = {}
    for method in ("contrib", "direct", "traced"):
        proto = export_forward(lm, method=method)
        o = ort.SessionOptions()
        o.log_severity_level = 3
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.optimized_model_filepath = str(__import__("tempfile").mktemp(suffix=".onnx"))
        ort.InferenceSession(proto.SerializeToString(), o, providers=["CPUExecutionProvider"])
        counts[method] = [n.op_type for n in onnx.load(o.optimized_model_filepath).graph.node]
    c, d, t = counts["contrib"], counts["direct"], counts["traced"]
    assert "Shape" not in d and "Shape" in t
    assert len(d) < 0.6 * len(t), (len(d), len(t))
    assert d.count("SimplifiedLayerNormalization") == 2 * 2 + 1 and d.count("QuickGelu") == 2
    assert len(c) < 0.6 * len(d), (len(c), len(d))
    assert c.count("MultiHeadAttention") == 2 and c.count("RotaryEmbedding") == 4 and "Softmax" not in c
    assert c.count("SkipSimplifiedLayerNormalization") == 2 * 2 and c.count("SimplifiedLayerNormalization") == 1


@pytest.mark.parametrize("variant,method", [("llama-rope-linear", "direct"), ("llama-mha-biases", "direct"),
                                            ("llama-mha-biases", "contrib"), ("llama-gqa", "direct"),
                                            ("qwen2-bias", "direct")])
def test_direct_greedy_matches_hf(variant, method, tmp_path):
    """End to end on configs and forwards the shared tiny ones do not cover (those, GQA, run contrib by default in
    every other test, as do the trained models, multi-head)."""
    cfg = VARIANTS[variant]
    lm = _lm(cfg)
    lm.model.save_pretrained(tmp_path / "m")
    art = dgopt.compile({"model": {"path": str(tmp_path / "m")}, "target": {"max_seq_len": 256, "forward": method}},
                        tmp_path / "a")
    dec = dgopt.load(art)
    assert dec.manifest["model"]["forward"] == method
    for p in PROMPTS[:3]:
        assert dec.generate(p, max_new_tokens=40).ids[0] == hf_greedy(lm.model, p, 40)


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias"])
def test_contrib_gqa_batch_and_multitoken_match_hf(variant, tmp_path):
    """GQA Llama and Qwen2 on contrib: a left-padded batch, autoregressive and lookahead, token for token."""
    lm = _lm(VARIANTS[variant])
    lm.model.save_pretrained(tmp_path / "m")
    refs = [hf_greedy(lm.model, p, 24) for p in PROMPTS]
    for strategy in ({"kind": "autoregressive"}, {"kind": "lookahead", "window": 4, "ngram": 3, "guesses": 3}):
        art = dgopt.compile({"model": {"path": str(tmp_path / "m")}, "strategy": strategy,
                             "target": {"max_seq_len": 256, "forward": "contrib"}}, tmp_path / strategy["kind"])
        assert dgopt.load(art).generate(PROMPTS, max_new_tokens=24).ids == refs


def test_forward_choice_in_spec(tmp_path):
    """target.forward: traced is honoured and recorded; auto writes contrib ops for onnxruntime on the CPU only
    (multi-head models), direct otherwise; direct on a family it cannot write is a one-line error, and so is contrib
    with the tensorrt backend."""
    art = dgopt.compile(tiny_spec("llama", target={"forward": "traced"}), tmp_path / "t")
    dec = dgopt.load(art)
    assert dec.manifest["model"]["forward"] == "traced"
    assert dec.generate(PROMPTS[0], max_new_tokens=20).ids[0] == hf_greedy(
        config_model(dict(TINY["llama"]), 0).eval(), PROMPTS[0], 20)
    assert dgopt.load(dgopt.compile(tiny_spec("gpt2"), tmp_path / "g")).manifest["model"]["forward"] == "traced"
    mha = {"model": {"config": VARIANTS["llama-mha-biases"]}}
    for device, want in (("cpu", "contrib"), ("cuda", "direct")):
        art = dgopt.compile(tiny_spec("llama", target={"device": device}, **mha), tmp_path / device)
        assert dgopt.artifact.read_manifest(art)["model"]["forward"] == want
    art = dgopt.compile(tiny_spec("llama"), tmp_path / "gqa")      # grouped-query attention: contrib too
    assert dgopt.artifact.read_manifest(art)["model"]["forward"] == "contrib"
    with pytest.raises(DgoptError, match=r"target.forward: direct cannot write this model: family gpt2"):
        dgopt.compile(tiny_spec("gpt2", target={"forward": "direct"}), tmp_path / "bad")
    with pytest.raises(DgoptError, match=r"target.forward.: contrib writes onnxruntime contrib ops"):
        dgopt.compile(tiny_spec("llama", target={"forward": "contrib", "backend": "tensorrt", "device": "cuda"}, **mha),
                      tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
