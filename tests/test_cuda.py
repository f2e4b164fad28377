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
