"""Step sessions: run the lowered step graph and own the KV cache's representation.

The decoder never touches KV tensors; it hands the session an opaque cache and gets the next one back. A CUDA
session with IO binding (KV kept on the device) is another class with the same three methods."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, BackendError

__all__ = ["OrtSession", "BoundSession", "make_session"]
log = logging.getLogger("dgopt.runtime")


class OrtSession:
    """onnxruntime on the host: KV cache as numpy arrays, `present` of one step becomes `past` of the next."""

    def __init__(self, step_path: Path, manifest: dict, providers: list[str], threads: int | None = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
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
        # the cache is one flat list over every kv input (a fused speculative step has the target's `past`, then
        # the draft's `draft_past`); `parts` says which slice belongs to which, for commits of one model's cache
        kv_in = [i for i in io["inputs"] if i["type"] == "kv"]
        kv_out = {o["name"]: o for o in io["outputs"] if o["type"] == "kv"}
        if kv_out:      # each cache output pairs with its input by name (past/present, draft_past/draft_present)
            pair = {i["name"]: kv_out.get(i["name"].replace("past", "present")) for i in kv_in}
            if any(o is None or len(o["tensors"]) != len(i["tensors"]) for i, o in zip(kv_in, pair.values())) \
                    or len(kv_out) != len(kv_in):
                raise ArtifactError(f"corrupt manifest: the kv outputs {sorted(kv_out)} of {step_path.name} do not "
                                    f"pair with its kv inputs {[i['name'] for i in kv_in]} (X_past -> X_present)")
            kv_out = [pair[i["name"]] for i in kv_in]
        self.past = {"tensors": [t for i in kv_in for t in i["tensors"]]} if kv_in else None
        self.present = {"tensors": [t for o in kv_out for t in o["tensors"]]} if kv_out else None
        self.parts, n = {}, 0
        for i in kv_in:
            self.parts[i["name"]] = slice(n, n + len(i["tensors"]))
            n += len(i["tensors"])
        kv_dtype = manifest["model"].get("kv_dtype", "float32")
        declared = {i.name: i for i in self.sess.get_inputs()}
        want = {"float32": "tensor(float)", "float16": "tensor(float16)"}.get(kv_dtype)
        kv_names = (self.past or {}).get("tensors", [])
        if want is None or any(t not in declared or declared[t].type != want for t in kv_names):
            raise ArtifactError(f"corrupt manifest: model.kv_dtype '{kv_dtype}' does not match the KV inputs of "
                                f"{step_path.name}")
        self._kv_dtype = np.dtype(kv_dtype)
        # [batch, heads, len, head_dim]: heads and head_dim are fixed in the graph, per model
        self._kv_shapes = [tuple(declared[t].shape[i] for i in (1, 3)) for t in kv_names]
        self._out_names = [o for o in self.sess.get_outputs()]
        self._out_names = [o.name for o in self._out_names]

    def new_cache(self, batch: int):
        return [np.zeros((batch, h, 0, d), self._kv_dtype) for h, d in self._kv_shapes]

    def grow(self, cache, n: int):
        """n more rows of zeros (rows that join a running call; their slots are masked)."""
        return [np.concatenate([t, np.zeros((n,) + t.shape[1:], t.dtype)]) for t in cache]

    def _part_name(self, part: str | None) -> str:
        return part or ("past" if "past" in self.parts else next(iter(self.parts)))

    def commit(self, cache, prefix: int, src: np.ndarray, count: int, part: str | None = None):
        """KV commit after verification: row b keeps slots [0, prefix) then `count` slots from src[b], in the
        tensors of kv input `part` (default: the first, the target's). Only the few accepted slots move (in place);
        then one contiguous copy, no gather over the whole cache."""
        out = list(cache)
        sl = self.parts[self._part_name(part)]
        moves = [(b, int(s)) for b, s in enumerate(src) if s != prefix] if count else []
        for j, t in enumerate(cache[sl], sl.start):
            for b, s in moves:
                t[b, :, prefix:prefix + count] = t[b, :, s:s + count].copy()
            out[j] = np.ascontiguousarray(t[:, :, :prefix + count])
        return out

    def select(self, cache, idx: np.ndarray, part: str | None = None):
        """Keep slots idx [B, keep] of each row (a cache compaction), in the tensors of kv input `part`."""
        out = list(cache)
        sl = self.parts[self._part_name(part)]
        idx = np.asarray(idx, np.int64)
        # one np.take per row: np.take_along_axis with a broadcast index ran ~40x slower (100 us per [1,4,150,64])
        out[sl] = [np.take(t, idx[0], axis=2) if len(idx) == 1 else
                   np.stack([np.take(t[b], idx[b], axis=1) for b in range(len(idx))]) for t in cache[sl]]
        return out

    def run(self, feeds: dict, cache) -> tuple[dict, object]:
        if self.past:
            feeds = {**feeds, **dict(zip(self.past["tensors"], cache))}
        vals = self.sess.run(self._out_names, feeds)
        out = dict(zip(self._out_names, vals))
        new_cache = [out.pop(n) for n in self.present["tensors"]] if self.present else cache
        return out, new_cache


def _kv_select_graph(n: int, heads: int, head_dim: int, dtype=np.float32):
    """out_i = t_i[:, :, idx[b], :] per row b: the device-side KV commit (GatherElements along the sequence axis)."""
    from onnx import TensorProto, helper, numpy_helper
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", "keep"])
    ins = [helper.make_tensor_value_info(f"t{i}", et, ["batch", heads, "len", head_dim])
           for i in range(n)]
    outs = [helper.make_tensor_value_info(f"o{i}", et, ["batch", heads, "keep", head_dim])
            for i in range(n)]
    inits = [numpy_helper.from_array(np.array([0, 1, -1, 1], np.int64), "shape4"),
             numpy_helper.from_array(np.array([1, heads, 1, head_dim], np.int64), "bcast")]
    nodes = [helper.make_node("Reshape", ["idx", "shape4"], ["idx4"]),                  # [B, 1, keep, 1]
             helper.make_node("Expand", ["idx4", "bcast"], ["gidx"])]                   # [B, heads, keep, head_dim]
    nodes += [helper.make_node("GatherElements", [f"t{i}", "gidx"], [f"o{i}"], axis=2) for i in range(n)]
    graph = helper.make_graph(nodes, "dgopt_kv_select", [idx] + ins, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="dgopt")
    model.ir_version = 10
    return model


class BoundSession(OrtSession):
    """onnxruntime with IO binding: the KV cache stays on `device` ("cuda": GPU memory) as OrtValues between steps;
    only ids, positions, masks and noise go in and the step's small outputs come back. A verify step's KV commit is
    a gather on the device (a tiny second graph), so nothing of the cache crosses to the host.
    Tested on the CPU EP here (same code path, device "cpu"); the CUDA EP run needs a GPU (tests/test_cuda.py)."""
    grow = None     # the cache is device memory: rows cannot join a running call (no continuous batching)

    def __init__(self, step_path: Path, manifest: dict, providers: list[str], threads: int | None = None,
                 device: str = "cpu"):
        super().__init__(step_path, manifest, providers, threads)
        import onnxruntime as ort
        self.device = device
        self._select = {}       # per kv part (they differ in heads / head_dim): the gather graph of its commit
        for name, sl in self.parts.items():
            g = _kv_select_graph(sl.stop - sl.start, *self._kv_shapes[sl.start], self._kv_dtype)
            self._select[name] = ort.InferenceSession(g.SerializeToString(), providers=providers)
        kv_out = set(self.present["tensors"]) if self.present else set()
        self._small_outs = [o for o in self._out_names if o not in kv_out]

    @staticmethod
    def _bind(io, name, value):
        """The first step's cache is the base class's zero-length numpy arrays; later ones are device OrtValues."""
        if isinstance(value, np.ndarray):
            io.bind_cpu_input(name, value)
        else:
            io.bind_ortvalue_input(name, value)

    def run(self, feeds: dict, cache) -> tuple[dict, object]:
        io = self.sess.io_binding()
        for k, v in feeds.items():
            io.bind_cpu_input(k, np.ascontiguousarray(v))
        if self.past:
            for name, t in zip(self.past["tensors"], cache):
                self._bind(io, name, t)
        for o in self._small_outs:
            io.bind_output(o, "cpu")
        kv = self.present["tensors"] if self.present else []
        for o in kv:
            io.bind_output(o, self.device)
        self.sess.run_with_iobinding(io)
        vals = dict(zip(self._small_outs + kv, io.get_outputs()))
        out = {o: vals[o].numpy() for o in self._small_outs}
        return out, ([vals[o] for o in kv] if kv else cache)

    def commit(self, cache, prefix: int, src: np.ndarray, count: int, part: str | None = None):
        B = len(src)
        idx = np.concatenate([np.broadcast_to(np.arange(prefix), (B, prefix)),
                              np.asarray(src)[:, None] + np.arange(count)[None, :]], 1).astype(np.int64)
        return self.select(cache, idx, part)

    def select(self, cache, idx: np.ndarray, part: str | None = None):
        part = self._part_name(part)
        sl, sel = self.parts[part], self._select[part]
        io = sel.io_binding()
        io.bind_cpu_input("idx", np.ascontiguousarray(idx, np.int64))
        for i, t in enumerate(cache[sl]):
            self._bind(io, f"t{i}", t)
            io.bind_output(f"o{i}", self.device)
        sel.run_with_iobinding(io)
        out = list(cache)
        out[sl] = io.get_outputs()
        return out


def make_session(art_dir: Path, manifest: dict, device: str | None = None, threads: int | None = None,
                 io_binding: bool | None = None):
    """io_binding: keep the KV cache on the device between steps (default: on for cuda, off for cpu, where plain
    numpy hand-over is as fast)."""
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
    asked = device
    device = device or manifest["target"]["device"]
    step = art_dir / manifest["step"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            if asked == "cuda":
                raise BackendError("device cuda: onnxruntime has no CUDAExecutionProvider here (pip install "
                                   "onnxruntime-gpu, dgopt[gpu]); pass device='cpu' to run on the CPU")
            log.warning("artifact targets cuda but onnxruntime has no CUDAExecutionProvider here; running on CPU "
                        "(install dgopt[gpu], or pass device='cuda' to make this an error)")
            device = "cpu"
        else:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            sess = OrtSession(step, manifest, providers, threads) if io_binding is False else \
                BoundSession(step, manifest, providers, threads, device="cuda")
            _require_cuda(sess)
            return sess
    if device != "cpu":
        raise ArtifactError(f"unknown device '{device}' (cpu or cuda)")
    if io_binding:
        return BoundSession(step, manifest, ["CPUExecutionProvider"], threads, device="cpu")
    return OrtSession(step, manifest, ["CPUExecutionProvider"], threads)


def _require_cuda(sess: OrtSession) -> None:
    """onnxruntime drops a provider it cannot start (CUDA libraries missing, driver too old) with only a log line:
    the session's own providers say what will run."""
    if not sess.providers or sess.providers[0] != "CUDAExecutionProvider":
        raise BackendError(f"device cuda: onnxruntime started this session on {', '.join(sess.providers) or 'nothing'}"
                           ", not CUDAExecutionProvider (CUDA or cuDNN libraries missing or mismatched?); "
                           "pass device='cpu' to run on the CPU")
