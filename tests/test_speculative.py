"""Speculative decoding (greedy): token-identical to target-only transformers generate for drafts that agree
always, never, or partly (rows accepting different counts in one batch), and for drafts whose vocabulary is
larger or smaller than the target's; with the draft fused into the target's step graph (the default) and with the
draft in its own draft.onnx (strategy.fused false)."""
import pytest

import dgopt
from conftest import PROMPTS, TINY, hf_greedy, hf_model, noisy_draft_dir, tiny_spec

NEW = 48


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")
    return {
        "noisy": noisy_draft_dir(root, "noisy", 0.002),
        "same": {"config": dict(TINY["llama"]), "seed": 0},
        "weak": {"config": {**TINY["llama"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 1}, "seed": 3},
        "bigger-vocab": {"config": {**TINY["llama"], "vocab_size": 400, "num_hidden_layers": 1}, "seed": 1},
        "smaller-vocab": {"config": {**TINY["gpt2"], "vocab_size": 200}, "seed": 2},
    }


@pytest.fixture(scope="module")
def refs():
    m = hf_model("llama")
    return [hf_greedy(m, p, NEW) for p in PROMPTS]


def compile_pair(tmp_path, draft, k=3, opt_level=2, fused=True):
    spec = tiny_spec("llama", strategy={"kind": "speculative", "k": k, "fused": fused})
    spec["draft"] = draft
    return dgopt.load(dgopt.compile(spec, tmp_path / f"spec-{k}-{opt_level}-{fused}", opt_level=opt_level))


@pytest.mark.parametrize("name,fused", [("noisy", True), ("same", True), ("weak", True), ("bigger-vocab", True),
                                        ("smaller-vocab", True), ("noisy", False), ("bigger-vocab", False)])
def test_greedy_exact_batch1_and_batch4(name, fused, drafts, refs, tmp_path):
    dec = compile_pair(tmp_path, drafts[name], fused=fused)
    assert bool(dec.manifest["draft"].get("fused")) == fused
    for p, ref in zip(PROMPTS, refs):
        assert dec.generate(p, max_new_tokens=NEW).ids[0] == ref
    res = dec.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert res.ids == refs[:4]
    rate = res.stats["acceptance_rate"]
    if name == "same":
        assert rate == 1.0 and res.stats["tokens_per_step"] == 4.0
    if name == "noisy":
        assert 0.05 < rate < 1.0 and len(res.stats["accepted_hist"]) > 2     # rows accept different counts
    if name == "weak":      # rejected proposals' slots outgrow the accepted ones: both caches get compacted
        assert rate < 0.3 and res.stats["cache_compactions"] >= 2


@pytest.mark.parametrize("k", [1, 5])
def test_k_values_O0_equals_O2_fused_equals_unfused(k, drafts, refs, tmp_path):
    d0 = compile_pair(tmp_path, drafts["noisy"], k, 0, fused=False)
    f0 = compile_pair(tmp_path, drafts["noisy"], k, 0)
    d2 = compile_pair(tmp_path, drafts["noisy"], k, 2)
    r0, r2 = d0.generate(PROMPTS[:4], max_new_tokens=NEW), d2.generate(PROMPTS[:4], max_new_tokens=NEW)
    rf = f0.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert r0.ids == rf.ids == r2.ids == refs[:4] and r0.stats["steps"] == rf.stats["steps"] == r2.stats["steps"]


def test_fused_graph_with_outputs_in_another_order(drafts, refs, tmp_path):
    """An explicit `graph:` spec may list draft_present before present: caches pair with inputs by name."""
    import yaml
    dec = compile_pair(tmp_path, drafts["noisy"])
    d = yaml.safe_load((dec.path / "ir.yaml").read_text())
    outs = d["graph"]["outputs"]
    d["graph"]["outputs"] = {n: outs[n] for n in ["draft_present", "accept_len", "accept_tokens", "best",
                                                   "proposals", "present"]}
    d["draft"] = drafts["noisy"]
    again = dgopt.load(dgopt.compile(d, tmp_path / "reordered"))
    assert again.generate(PROMPTS[:4], max_new_tokens=NEW).ids == refs[:4]


@pytest.mark.parametrize("fused", [True, False])
def test_repeated_calls_identical(fused, drafts, tmp_path):
    dec = compile_pair(tmp_path, drafts["noisy"], fused=fused)
    a, b = dec.generate(PROMPTS[:3], max_new_tokens=NEW), dec.generate(PROMPTS[:3], max_new_tokens=NEW)
    assert a.ids == b.ids and a.stats["steps"] == b.stats["steps"]
    want = {"fused", "acceptance_rate"} if fused else {"draft_s", "target_s", "acceptance_rate"}
    assert want <= set(a.stats)


def test_artifact_step_graphs(drafts, tmp_path):
    """Unfused: draft.onnx beside step.onnx. Fused: one step.onnx with both models' weights and both caches."""
    import onnx
    dec = compile_pair(tmp_path, drafts["weak"], fused=False)
    assert (dec.path / "draft.onnx").is_file() and "draft.onnx" in dec.manifest["files"]
    assert dec.manifest["draft"]["model"]["num_layers"] == 1
    dec = compile_pair(tmp_path, drafts["weak"])
    assert not (dec.path / "draft.onnx").exists() and dec.draft_session is None
    assert dec.manifest["draft"]["model"]["num_layers"] == 1
    kv = {i["name"]: len(i["tensors"]) for i in dec.manifest["io"]["inputs"] if i["type"] == "kv"}
    assert kv == {"past": 2 * TINY["llama"]["num_hidden_layers"], "draft_past": 2}
    inits = {t.name.split("/")[0] for t in onnx.load(str(dec.path / "step.onnx")).graph.initializer}
    assert {"target", "draft"} <= inits


def test_missing_draft_is_a_spec_error(tmp_path):
    from dgopt.errors import SpecError
    from dgopt.spec import spec_from_dict
    with pytest.raises(SpecError, match="'draft'"):
        spec_from_dict(tiny_spec(strategy={"kind": "speculative"}))


def test_draft_chain_one_call_equals_k_steps(drafts, tmp_path):
    """The compiled greedy draft proposes k tokens in ONE call (k chained forwards, next_inputs between them); it
    equals k one-token greedy steps of the draft model in torch, from a past with masked holes, batch 2, and its
    cache equals theirs (pending block + d_1..d_{k-1})."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import DynamicCache

    from dgopt.models.hf import config_model
    k = 4
    dec = compile_pair(tmp_path, drafts["weak"], k=k, fused=False)
    sess = ort.InferenceSession(str(dec.path / "draft.onnx"), providers=["CPUExecutionProvider"])
    model = config_model(dict(drafts["weak"]["config"]), drafts["weak"]["seed"]).eval()
    rng = np.random.default_rng(0)
    B, P, q, L = 2, 6, 3, 1
    H, D = 1, 16   # weak draft: 1 kv head of 32 / 2 heads
    past = [rng.normal(size=(B, H, P, D)).astype(np.float32) for _ in range(2 * L)]
    valid = np.ones((B, P + q), bool)
    valid[0, 2] = valid[1, 4] = valid[1, P] = False           # holes in the past and in the fed block
    mask = np.where(valid[:, None, None, :] & np.tril(np.ones((q, P + q), bool), P)[None, None],
                    0.0, np.finfo(np.float32).min).astype(np.float32)
    ids = rng.integers(0, 320, (B, q))
    pos = np.stack([P + np.arange(q)] * B)
    feeds = {"input_ids": ids, "position_ids": pos, "attn_mask": mask}
    feeds |= {f"past.{i // 2}.{'key' if i % 2 == 0 else 'value'}": t for i, t in enumerate(past)}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    cache = DynamicCache(config=model.config)
    for i in range(L):
        cache.update(torch.from_numpy(past[2 * i]), torch.from_numpy(past[2 * i + 1]), i)
    x, p, m, props = torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(mask), []
    with torch.no_grad():
        for _ in range(k):
            out = model(input_ids=x, position_ids=p, attention_mask=m, past_key_values=cache, use_cache=True)
            props.append(out.logits[:, -1].argmax(-1))
            x, p = props[-1][:, None], p[:, -1:] + 1
            m = torch.cat([m[:, :, -1:], torch.zeros(B, 1, 1, 1)], 3)
    assert outs["proposals"].tolist() == torch.stack(props, 1).tolist()
    ref_kv = [cache.layers[0].keys, cache.layers[0].values]
    assert outs["present.0.key"].shape == (B, H, P + q + k - 1, D)
    for got, ref in zip((outs["present.0.key"], outs["present.0.value"]), ref_kv):
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("Vd", [30, 50, 70])
def test_draft_glue_lowering(Vd):
    """to_target_vocab (the draft's scores over the target's V = 50: cut, -inf padded, or as they are, from the
    draft's static vocabulary size) and next_inputs (the chained forward's ids, position + 1, the last mask row and
    a 0 column for the new token) lower to what they mean."""
    import numpy as np
    import onnxruntime as ort
    from dgopt.backends.onnx import lower_to_onnx
    from dgopt.ir import Graph
    V, B = 50, 3
    g = Graph()
    x = g.add("input", attrs={"name": "logits", "type": "logits"}, id="logits")
    tok = g.add("input", attrs={"name": "token", "type": "token"}, id="token")
    pos = g.add("input", attrs={"name": "position_ids", "type": "positions"}, id="pos")
    mask = g.add("input", attrs={"name": "attn_mask", "type": "mask"}, id="mask")
    g.set_output("scores", g.add("to_target_vocab", [x], id="tv").out())
    nxt = g.add("next_inputs", [tok, pos, mask], id="next")
    for o in ("ids", "positions", "mask"):
        g.set_output(f"next_{o}", nxt.out(o))
    model, _ = lower_to_onnx(g, {"draft": (None, {"vocab_size": Vd})}, vocab_size=V)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "draft_vocab"   # a graph input stands for them
    if Vd == V:
        assert not [n for n in model.graph.node if n.name.startswith("tv/")]
    rng = np.random.default_rng(0)
    feeds = {"logits": rng.normal(size=(B, Vd)).astype(np.float32), "token": np.array([4, 7, 9]),
             "position_ids": np.array([[3, 4], [8, 9], [0, 1]]),
             "attn_mask": rng.normal(size=(B, 1, 2, 6)).astype(np.float32)}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    scores, ids, p, m = sess.run(["scores", "next_ids", "next_positions", "next_mask"], feeds)
    want = np.full((B, V), -np.inf, np.float32)
    want[:, :min(V, Vd)] = feeds["logits"][:, :V]
    assert np.array_equal(scores, want)
    assert np.array_equal(ids, [[4], [7], [9]]) and np.array_equal(p, [[5], [10], [2]])
    assert m.shape == (B, 1, 1, 7) and np.array_equal(m[..., :6], feeds["attn_mask"][:, :, -1:]) and \
        (m[..., 6] == 0).all()
