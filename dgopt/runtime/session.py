"""Step sessions: run the lowered step graph and own the KV cache's representation.

The decoder never touches KV tensors; it hands the session an opaque cache and gets the next one back. A CUDA
session with IO binding (KV kept on the device) is another class with the same three methods."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ArtifactError

__all__ = ["OrtSession", "make_session"]
log = logging.getLogger("dgopt.runtime")


class OrtSession:
    """onnxruntime on the host: KV cache as numpy arrays, `present` of one step becomes `past` of the next."""

    def __init__(self, step_path: Path, manifest: dict, providers: list[str], threads: int | None = None,
                 spin: bool = True):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if not spin:    # two sessions taking turns (target, draft): spinning workers of one starve the other
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.sess = ort.InferenceSession(str(step_path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own types for a bad graph
            raise ArtifactError(f"onnxruntime cannot load {step_path.name}: {str(e).splitlines()[0]}") from None
        self.providers = self.sess.get_providers()
        io = manifest["io"]
        self.inputs = {i["name"]: i for i in io["inputs"]}
        self.outputs = {o["name"]: o for o in io["outputs"]}
        self.past = next((i for i in io["inputs"] if i["type"] == "kv"), None)
        self.present = next((o for o in io["outputs"] if o["type"] == "kv"), None)
        m = manifest["model"]
        self._kv_shape = (m["num_kv_heads"], m["head_dim"])
        self._out_names = [o for o in self.sess.get_outputs()]
        self._out_names = [o.name for o in self._out_names]

    def new_cache(self, batch: int):
        h, d = self._kv_shape
        return [np.zeros((batch, h, 0, d), np.float32) for _ in self.past["tensors"]] if self.past else []

    def commit(self, cache, prefix: int, src: np.ndarray, count: int):
        """KV commit after verification: row b keeps slots [0, prefix) then `count` slots from src[b].
        Only the few accepted slots move (in place); then one contiguous copy, no gather over the whole cache."""
        out = []
        for t in cache:
            for b, s in enumerate(src):
                if s != prefix and count:
                    t[b, :, prefix:prefix + count] = t[b, :, s:s + count].copy()
            out.append(np.ascontiguousarray(t[:, :, :prefix + count]))
        return out

    def run(self, feeds: dict, cache) -> tuple[dict, object]:
        if self.past:
            feeds = dict(feeds, **dict(zip(self.past["tensors"], cache)))
        vals = self.sess.run(self._out_names, feeds)
        out = dict(zip(self._out_names, vals))
        new_cache = [out.pop(n) for n in self.present["tensors"]] if self.present else cache
        return out, new_cache


def make_session(art_dir: Path, manifest: dict, device: str | None = None, threads: int | None = None,
                 spin: bool = True):
    import onnxruntime as ort
    if manifest["target"]["backend"] == "tensorrt" and manifest.get("tensorrt") and device in (None, "cuda"):
        from ..backends.tensorrt import TrtSession, check_engine_compat, is_available
        try:
            if not is_available():
                raise ArtifactError("TensorRT is not installed here (or no CUDA device)")
            check_engine_compat(manifest)
            return TrtSession(art_dir, manifest)
        except ArtifactError as e:
            log.warning("%s; falling back to the artifact's ONNX step graph", e)
    device = device or manifest["target"]["device"]
    step = art_dir / manifest["step"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            log.warning("artifact targets cuda but onnxruntime has no CUDAExecutionProvider here; running on CPU "
                        "(install dgopt[gpu])")
            device = "cpu"
        else:
            return OrtSession(step, manifest, ["CUDAExecutionProvider", "CPUExecutionProvider"], threads, spin)
    if device != "cpu":
        raise ArtifactError(f"unknown device '{device}' (cpu or cuda)")
    return OrtSession(step, manifest, ["CPUExecutionProvider"], threads, spin)
