"""A session asked for CUDA runs on CUDA or says why not: never a CPU run labelled cuda (onnxruntime drops a
provider it cannot start with only a log line, so the session's own get_providers() decides)."""
import logging

import onnxruntime as ort
import pytest
from conftest import tiny_spec

import dgopt
from dgopt.errors import BackendError


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return dgopt.compile(tiny_spec("llama"), tmp_path_factory.mktemp("prov") / "a")


def test_cuda_without_the_cuda_provider_is_a_one_line_error(art):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP")
    with pytest.raises(BackendError, match="device cuda: onnxruntime has no CUDAExecutionProvider") as e:
        dgopt.load(art, device="cuda")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("io_binding", [False, True])
def test_a_cuda_provider_that_does_not_start_is_caught_from_the_session(art, monkeypatch, io_binding):
    """Pretend the CUDA EP is installed: onnxruntime (CPU build here) then starts the session on the CPU EP alone,
    as it does on a GPU machine whose CUDA libraries do not load; make_session reads the session's providers."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match="started this session on CPUExecutionProvider, not CUDAExecutionProvider"):
        dgopt.load(art, device="cuda", io_binding=io_binding)


def test_a_cuda_artifact_loaded_without_a_device_falls_back_with_a_warning(tmp_path, caplog):
    """No device asked: an artifact compiled for cuda runs on the CPU with a warning, and says so."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP")
    art = dgopt.compile(tiny_spec("llama", target={"device": "cuda"}), tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="dgopt.runtime"):
        dec = dgopt.load(art)
    assert dec.session.providers == ["CPUExecutionProvider"]
    assert "no CUDAExecutionProvider" in caplog.text
