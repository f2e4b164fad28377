"""precision fp16 (onnx backend, device cuda): the forward is exported from a half copy of the model, so weights,
KV cache and the model's own arithmetic are fp16 as in transformers' fp16 inference; the step's mask input and the
logits the processors see stay fp32. Run here on onnxruntime's CPU EP (which inserts fp32 casts around kernels it
lacks in fp16): the artifact is valid, its cache is fp16 end to end, and its greedy output equals transformers'
fp16 model. The same artifact on the CUDA EP is tests/test_cuda.py's job (needs a GPU)."""
import numpy as np
import onnx
import pytest
import torch

import dgopt
from conftest import PROMPTS, tiny_spec

from dgopt.backends.onnx.forward import FP16_MASK_MIN

FP16 = {"device": "cuda", "precision": "fp16"}


def _compile(tmp_path, spec, name):
    return dgopt.compile(spec, tmp_path / name)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_fp16_artifact_is_half_and_batch_rows_match_single_rows(family, tmp_path):
    """Weights and KV are fp16, and left-padded batch 4 (pad rows fully masked) gives each row what it gets alone."""
    art = _compile(tmp_path, tiny_spec(family, target=FP16), family)
    m = onnx.load(str(art / "step.onnx"))
    big = [t for t in m.graph.initializer if np.prod(t.dims) >= 1024]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    kv_in = [i for i in m.graph.input if i.name.startswith("past.")]
    assert kv_in and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in kv_in)
    dec = dgopt.load(art, device="cpu")
    assert dec.manifest["model"]["kv_dtype"] == "float16"
    rows = PROMPTS[:4]
    batch = dec.generate(rows, max_new_tokens=24).ids
    assert batch == [dec.generate([r], max_new_tokens=24).ids[0] for r in rows]


def test_fp16_code_tiny_matches_transformers_fp16(tmp_path):
    from transformers import AutoModelForCausalLM

    from dgopt.training.trainer import model_dir
    spec = {"model": {"name": "code-tiny"}, "target": {**FP16, "max_seq_len": 512}}
    dec = dgopt.load(_compile(tmp_path, spec, "tiny16"), device="cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir("code-tiny"), dtype=torch.float16,
                                                 attn_implementation="eager").eval()
    for text in ("def __init__(self", "import "):
        ids = dec.encode(text)
        t = torch.tensor([ids])
        with torch.no_grad():
            ref = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=40, do_sample=False)
        assert dec.generate(ids, max_new_tokens=40).ids[0] == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("io_binding", [False, True])
def test_fp16_speculative_equals_fp16_autoregressive(io_binding, tmp_path):
    """Draft and target both fp16; the verify forward and the KV commit (numpy, or the IO-binding session's gather
    graph) work on half caches; output equals the fp16 autoregressive artifact's."""
    base = {"model": {"name": "code-tiny"}, "target": {**FP16, "max_seq_len": 512}}
    ar = dgopt.load(_compile(tmp_path, base, "ar16"), device="cpu")
    spec = dgopt.load(_compile(tmp_path, {**base, "draft": {"name": "code-draft"},
                                          "strategy": {"kind": "speculative", "k": 3}}, "spec16"),
                      device="cpu", io_binding=io_binding)
    rows = [ar.encode(t) for t in ("def main():\n    ", "class ", "for i in range(")]
    assert spec.generate(rows, max_new_tokens=40).ids == ar.generate(rows, max_new_tokens=40).ids


def test_bf16_onnx_is_a_one_line_spec_error(tmp_path):
    from dgopt.errors import SpecError
    with pytest.raises(SpecError, match="target.precision"):
        _compile(tmp_path, tiny_spec(target={"device": "cuda", "precision": "bf16"}), "bf16")


def test_fp16_forward_keeps_fp32_buffers_and_matches_transformers_fp16():
    """The fp16 forward keeps buffers fp32 as transformers' fp16 model does (the rotary frequencies: rounded to half
    they shift every position's angle), and its logits at positions 900-907 are within a few fp16 ulps of
    transformers' fp16 model (eager attention)."""
    import onnxruntime as ort
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM

    from dgopt.models.hf import export_forward, load_model
    from dgopt.training.trainer import model_dir
    from dgopt.spec import spec_from_dict
    lm = load_model(spec_from_dict({"model": {"name": "code-tiny"}}).model)
    half = export_forward(lm, "float16")

    def rotary(m):
        consts = [numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"]
        consts += [numpy_helper.to_array(t) for t in m.graph.initializer]
        return [c for c in consts if c.size == lm.info["head_dim"] // 2 and c.dtype.kind == "f"]
    inv32 = rotary(export_forward(lm, method="traced"))      # fp16 is traced; its fp32 twin holds the same buffers
    assert inv32 and all(c.dtype == np.float32 for c in rotary(half))
    assert all(any(np.array_equal(c, r) for r in inv32) for c in rotary(half))

    sess = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = AutoModelForCausalLM.from_pretrained(model_dir("code-tiny"), dtype=torch.float16,
                                               attn_implementation="eager").eval()
    ids = np.array([[5, 17, 42, 99, 3, 7, 8, 100]])
    pos = np.arange(900, 908)[None]
    mask = np.where(np.tril(np.ones((8, 8), bool)), 0.0, -30000.0).astype(np.float16)[None, None]
    H, D = lm.info["num_kv_heads"], lm.info["head_dim"]
    feeds = {"input_ids": ids, "position_ids": pos, "attn_mask": mask}
    feeds |= {i.name: np.zeros((1, H, 0, D), np.float16) for i in sess.get_inputs()[3:]}
    got = sess.run(["logits"], feeds)[0].astype(np.float32)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos),
                   attention_mask=torch.from_numpy(mask)).logits.float().numpy()
    assert np.abs(got - want).max() < 0.04, np.abs(got - want).max()


def ragged_first_step(sess, vocab_size: int, pad: int = 5, T: int = 8):
    """One prefill step of a 2-row batch whose row 0 is left-padded by `pad` fully masked slots, with the host's
    float32-min mask (what the runtime feeds); the other inputs a sampling step needs are filled. -> (outputs, cache)"""
    ids = np.tile(np.arange(3, 3 + T, dtype=np.int64), (2, 1))
    pos = np.tile(np.arange(T, dtype=np.int64), (2, 1))
    pos[0] = np.maximum(np.arange(T) - pad, 0)
    keep = np.tril(np.ones((T, T), bool))[None].repeat(2, 0)
    keep[0, :, :pad] = False
    mask = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    feeds = {"input_ids": ids, "position_ids": pos, "attn_mask": mask}
    for name, io in sess.inputs.items():
        if name not in feeds and io["type"] != "kv":
            shape = [2 if d == "batch" else d for d in io["shape"]]
            assert all(isinstance(d, int) for d in shape), (name, io["shape"])
            feeds[name] = np.full(shape, 0.5, np.float32)
    return sess.run(feeds, sess.new_cache(2))


def _finite(out, cache) -> bool:
    vals = [v for v in out.values() if np.asarray(v).dtype.kind == "f"] + [np.asarray(t) for t in cache]
    return all(np.isfinite(np.asarray(v, np.float32)).all() for v in vals)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_fp16_step_with_fully_masked_rows_has_no_nan(family, tmp_path):
    """The fp16 step graph (what onnxruntime's CUDA EP and a TensorRT fp16 engine run) on a ragged batch whose pad
    slots are fully masked, fed the host's float32-min mask: logits and KV stay finite, because the lowering clamps
    the mask to -30000 (inside fp16's +-65504; finfo(fp16).min itself would overflow to -inf once a score is added)
    before the Cast. Without the clamp the Cast makes -inf and the same step gives NaN: the test sees it."""
    from dgopt.runtime.session import OrtSession
    spec = tiny_spec(family, target=FP16)
    spec["sampling"] = {"kind": "sample", "top_k": 5, "noise": "precomputed"}
    art = _compile(tmp_path, spec, family)
    manifest = dgopt.load(art, device="cpu").manifest
    sess = OrtSession(art / "step.onnx", manifest, ["CPUExecutionProvider"])
    out, cache = ragged_first_step(sess, manifest["model"]["vocab_size"])
    assert _finite(out, cache)


@pytest.mark.parametrize("floor,finite", [(None, False), (float(np.finfo(np.float16).min), False),
                                          (FP16_MASK_MIN, True)])
def test_the_fp16_mask_floor(floor, finite):
    """Why the lowering floors the mask at -30000: a fully masked row through an fp16 Add and Softmax, in IEEE fp16
    arithmetic (numpy; what fp16 GPU kernels do; onnxruntime's CPU EP runs these ops through fp32 and shows
    neither failure). The bare float32 minimum casts to -inf (NaN); finfo(fp16).min = -65504 is finite, but adding
    scores below -16 rounds past 65504 to -inf (a row of them: NaN again); -30000 leaves room for any score."""
    mask = np.full(4, np.finfo(np.float32).min, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        m16 = (mask if floor is None else np.maximum(mask, np.float32(floor))).astype(np.float16)
        s = np.array([-20.0, -17.0, -40.0, -18.0], np.float16) + m16
        e = np.exp(s - s.max())
        p = e / e.sum()
    assert np.isfinite(p).all() == finite
