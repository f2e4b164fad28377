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
