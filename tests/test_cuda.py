"""ONNX Runtime CUDA: the same artifact on the GPU gives the CPU's tokens. Skips without onnxruntime-gpu and a GPU
(the machines this project is built on have none; see README, TensorRT / GPU)."""
import pytest

import dgopt
from conftest import PROMPTS, hf_greedy, hf_model, tiny_spec

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="no CUDA: onnxruntime-gpu not installed or no GPU")


@pytest.mark.parametrize("strategy", [{"kind": "autoregressive"}, {"kind": "lookahead", "window": 4, "ngram": 3,
                                                                   "guesses": 3}])
def test_cuda_greedy_matches_cpu_and_transformers(strategy, tmp_path):
    art = dgopt.compile(tiny_spec("llama", strategy=strategy, target={"device": "cuda"}), tmp_path / "cuda")
    gpu, cpu = dgopt.load(art), dgopt.load(art, device="cpu")
    assert gpu.session.providers[0] == "CUDAExecutionProvider"
    from dgopt.runtime.session import BoundSession
    assert isinstance(gpu.session, BoundSession) and gpu.session.device == "cuda"     # KV stays on the GPU
    model = hf_model("llama")
    for p in PROMPTS:
        assert gpu.generate(p, max_new_tokens=32).ids[0] == cpu.generate(p, max_new_tokens=32).ids[0] == \
            hf_greedy(model, p, 32)
    assert gpu.generate(PROMPTS[:4], max_new_tokens=32).ids == cpu.generate(PROMPTS[:4], max_new_tokens=32).ids


def test_cuda_sampling_seeded_repeatable(tmp_path):
    art = dgopt.compile(tiny_spec("llama", sampling={"kind": "sample", "top_k": 20}, target={"device": "cuda"}),
                        tmp_path / "cuda-s")
    dec = dgopt.load(art)
    assert dec.generate(PROMPTS[:2], max_new_tokens=16, seed=3).ids == \
        dec.generate(PROMPTS[:2], max_new_tokens=16, seed=3).ids


def test_cuda_fp16_matches_transformers_fp16_on_gpu(tmp_path):
    """precision fp16 on the CUDA EP: the trained code-tiny's greedy output equals transformers' fp16 model on the
    GPU, and the fp16 KV cache stays on the device (the same artifact on the CPU EP is tests/test_fp16.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dgopt.training.trainer import model_dir
    from dgopt.runtime.session import BoundSession
    spec = {"model": {"name": "code-tiny"}, "target": {"device": "cuda", "precision": "fp16", "max_seq_len": 512}}
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "fp16"))
    assert isinstance(dec.session, BoundSession) and dec.session.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(model_dir("code-tiny"), dtype=torch.float16,
                                                 attn_implementation="eager").cuda().eval()
    for text in ("def __init__(self", "import "):
        ids = dec.encode(text)
        t = torch.tensor([ids], device="cuda")
        with torch.no_grad():
            ref = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=40, do_sample=False)
        assert dec.generate(ids, max_new_tokens=40).ids[0] == ref[0, len(ids):].tolist()
