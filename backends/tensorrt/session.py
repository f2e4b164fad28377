"""A step session over a TensorRT engine, with the interface of `dgopt.runtime.session.OrtSession`:

    inputs / outputs     the manifest's io entries by name
    new_cache(batch)     an empty KV cache: torch CUDA tensors [batch, kv_heads, 0, head_dim]
    run(feeds, cache)    -> (outputs as numpy arrays, next cache); the KV cache never leaves the GPU

Each step: host feeds are copied to the device, every input's shape is set (`set_input_shape`), outputs are allocated
at the shapes the context infers, every address is bound (`set_tensor_address`) and the engine runs on a dedicated
CUDA stream (`execute_async_v3`). `present` of one step is `past` of the next, as device tensors.

`check_engine_compat(manifest)` refuses an engine built by another TensorRT version or for another GPU architecture
(a serialized engine only loads in the exact TensorRT version, on the compute capability, that built it).

Written against the documented TensorRT 10 Python API; not run here (no TensorRT, no GPU on the build machines)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dgopt.errors import ArtifactError, BackendError

from .build import ENGINE_FILE, import_tensorrt, make_logger

__all__ = ["TrtSession", "check_engine_compat"]
log = logging.getLogger("dgopt.tensorrt")


def check_engine_compat(manifest: dict, trt_version: str | None = None,
                        compute_capability: tuple[int, int] | list | None = None) -> None:
    """Raise ArtifactError (one line) unless the installed TensorRT and this GPU match the manifest's
    `tensorrt: {version, compute_capability}`. `trt_version` / `compute_capability` override what is detected."""
    info = manifest.get("tensorrt")
    if not isinstance(info, dict) or "version" not in info or "compute_capability" not in info:
        raise ArtifactError("artifact has no TensorRT engine (manifest has no 'tensorrt' entry with version and "
                            "compute_capability); build one with dgopt.backends.tensorrt.build_engine")
    if trt_version is None:
        trt_version = import_tensorrt().__version__
    if compute_capability is None:
        import torch
        if not torch.cuda.is_available():
            raise BackendError("tensorrt: no CUDA device visible to torch")
        compute_capability = torch.cuda.get_device_capability()
    if str(info["version"]) != str(trt_version):
        raise ArtifactError(f"engine was built with TensorRT {info['version']} but TensorRT {trt_version} is "
                            "installed (an engine only loads in the version that built it); rebuild the engine")
    want = [int(x) for x in info["compute_capability"]]
    have = [int(x) for x in compute_capability]
    if want != have:
        raise ArtifactError(f"engine was built for compute capability {want[0]}.{want[1]} but this GPU is "
                            f"{have[0]}.{have[1]}; rebuild the engine on this machine")


def _torch_dtypes(trt, torch) -> dict:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for t, x in (("bfloat16", "bfloat16"), ("int64", "int64"), ("uint8", "uint8")):
        if hasattr(trt, t):
            table[getattr(trt, t)] = getattr(torch, x)
    return table


class TrtSession:
    """TensorRT engine of an artifact; KV cache as torch CUDA tensors."""

    def __init__(self, art_dir: str | Path, manifest: dict, engine: str | Path | None = None, device: int = 0,
                 check_compat: bool = True):
        trt = import_tensorrt()
        import torch
        if not torch.cuda.is_available():
            raise BackendError("tensorrt: no CUDA device visible to torch")
        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        info = manifest.get("tensorrt") or {}
        if check_compat and info:
            check_engine_compat(manifest)
        path = Path(engine) if engine else Path(art_dir) / info.get("engine", ENGINE_FILE)
        if not path.is_file():
            raise ArtifactError(f"TensorRT engine not found: {path}")
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            errs = self.logger.errors()
            raise ArtifactError(f"TensorRT cannot load {path.name}: {errs[-1] if errs else 'deserialization failed'}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError("tensorrt: cannot create an execution context (out of GPU memory?)")
        self.stream = torch.cuda.Stream(device=self.device)
        self.providers = [f"TensorRT {trt.__version__}"]

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._in_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._out_names = [n for n in names if n not in self._in_names]
        table = _torch_dtypes(trt, torch)
        try:
            self._dtype = {n: table[self.engine.get_tensor_dtype(n)] for n in names}
        except KeyError as e:
            raise BackendError(f"tensorrt: engine tensor of unsupported type {e}") from None

        io = manifest["io"]
        self.inputs = {i["name"]: i for i in io["inputs"]}
        self.outputs = {o["name"]: o for o in io["outputs"]}
        self.past = next((i for i in io["inputs"] if i["type"] == "kv"), None)
        self.present = next((o for o in io["outputs"] if o["type"] == "kv"), None)
        missing = [n for n in (self.past["tensors"] if self.past else []) + (self.present["tensors"] if self.present
                                                                              else []) if n not in names]
        if missing:
            raise ArtifactError(f"TensorRT engine {path.name} has no tensor '{missing[0]}' named in the manifest; "
                                "rebuild the engine from this artifact")
        m = manifest["model"]
        self._kv_shape = (m["num_kv_heads"], m["head_dim"])
        self._dummy = torch.empty(1, dtype=torch.float32, device=self.device)   # address for empty tensors

    def new_cache(self, batch: int):
        if not self.past:
            return []
        h, d = self._kv_shape
        return [self._torch.zeros((batch, h, 0, d), dtype=self._dtype[n], device=self.device)
                for n in self.past["tensors"]]

    def commit(self, cache, prefix: int, src, count: int):
        """KV commit after verification (as OrtSession.commit): row b keeps slots [0, prefix) then `count` slots
        starting at src[b]; on the device."""
        out = []
        for t in cache:
            for b, s in enumerate(np.asarray(src).reshape(-1).tolist()):
                if s != prefix and count:
                    t[b, :, prefix:prefix + count] = t[b, :, s:s + count].clone()
            out.append(t[:, :, :prefix + count].contiguous())
        return out

    def select(self, cache, index, part: str | None = None):
        """Keep cache slots `index` [B, T'] per row (a cache compaction), on the device."""
        idx = self._torch.as_tensor(np.asarray(index), device=self.device)
        return [self._torch.gather(t, 2, idx[:, None, :, None].expand(t.shape[0], t.shape[1], idx.shape[1],
                                                                       t.shape[3])) for t in cache]

    def _addr(self, t) -> int:
        return t.data_ptr() if t.numel() else self._dummy.data_ptr()

    def run(self, feeds: dict, cache) -> tuple[dict, object]:
        torch, ctx = self._torch, self.context
        kv_in = dict(zip(self.past["tensors"], cache)) if self.past else {}
        keep = []                                 # device tensors that must live until the stream is done
        for name in self._in_names:
            if name in kv_in:
                t = kv_in[name]
            else:
                if name not in feeds:
                    raise BackendError(f"tensorrt: step input '{name}' was not fed")
                t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            t = t.to(self.device, self._dtype[name]).contiguous()
            keep.append(t)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise BackendError(f"tensorrt: input '{name}' of shape {tuple(t.shape)} is outside the engine's "
                                   "optimization profile (rebuild with a larger max_batch / max_seq_len)")
            ctx.set_tensor_address(name, self._addr(t))
        outs = {}
        for name in self._out_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"tensorrt: output '{name}' has an undetermined shape {shape}")
            o = torch.empty(shape, dtype=self._dtype[name], device=self.device)
            outs[name] = o
            ctx.set_tensor_address(name, self._addr(o))
        self.stream.wait_stream(torch.cuda.current_stream(self.device))   # the host->device copies above
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            errs = self.logger.errors()
            raise BackendError(f"tensorrt: execution failed: {errs[-1] if errs else 'execute_async_v3 returned False'}")
        self.stream.synchronize()
        del keep
        new_cache = [outs.pop(n) for n in self.present["tensors"]] if self.present else cache
        return {n: t.cpu().numpy() for n, t in outs.items()}, new_cache
