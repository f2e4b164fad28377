"""Build a TensorRT engine (`engine.plan`) from an artifact's `step.onnx`, with the TensorRT 10 Python API.

    builder = trt.Builder(logger); network = builder.create_network(0)    # explicit batch is the only mode in 10.x
    trt.OnnxParser(network, logger).parse_from_file(step.onnx)            # parser errors name the ONNX node
    config: FP16 / BF16 flag, a workspace limit, one optimization profile, a timing cache file
    builder.build_serialized_network(network, config) -> engine.plan

The optimization profile covers every dynamic input of the step graph by the name of its symbolic dims (what the
lowering writes): batch 1..max_batch, q 1..max_seq_len, past 0..max_seq_len-1, total 1..max_seq_len; fixed dims
(vocabulary, heads, head_dim) stay fixed. At FP16/BF16 the processors and sampler (every layer not inlined from the
model forward) are pinned to FP32 with PREFER_PRECISION_CONSTRAINTS: cumulative sums, softmax over the vocabulary and
the -inf fills are where reduced precision changes which token is drawn.

`tensorrt` is imported only inside `build_engine`; without it the call raises `BackendError("TensorRT not installed
...")`. Written against the documented TensorRT 10 API; it has not been run here (no TensorRT, no GPU on the machines
this project is built on)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import onnx

from dgopt.errors import BackendError

__all__ = ["build_engine", "profile_shapes", "import_tensorrt", "make_logger", "ENGINE_FILE", "TIMING_CACHE_FILE",
           "DIM_RANGES"]
log = logging.getLogger("dgopt.tensorrt")

ENGINE_FILE = "engine.plan"
TIMING_CACHE_FILE = "timing.cache"
DIM_RANGES = ("batch", "q", "past", "total")       # the symbolic dims of the lowered step's inputs


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001 - ImportError, or an OSError from a missing libnvinfer
        raise BackendError(f"TensorRT not installed (pip install 'dgopt[tensorrt]' on a CUDA machine); "
                           f"import tensorrt failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return trt


def make_logger(trt, verbose: bool = False):
    """A trt.ILogger that keeps the messages (build errors are reported from them) and forwards to `logging`."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[int, str]] = []

        def log(self, severity, msg):
            sev = int(severity)
            self.messages.append((sev, msg))
            if sev <= int(trt.ILogger.Severity.ERROR):
                log.error("TensorRT: %s", msg)
            elif sev <= int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)
            elif verbose:
                log.info("TensorRT: %s", msg)

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s <= int(trt.ILogger.Severity.ERROR)]

    return _Logger()


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]


def profile_shapes(model: onnx.ModelProto | str | Path, max_batch: int, max_seq_len: int, opt_batch: int | None = None,
                   opt_q: int = 1, opt_past: int | None = None) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per graph input, from its dims: ints stay fixed; `batch`, `q`, `past`, `total` get
    [1, max_batch], [1, max_seq_len], [0, max_seq_len - 1], [1, max_seq_len]. The opt point is one decode step
    (q = opt_q) at half the context (past = max_seq_len // 2) and batch opt_batch (default max_batch)."""
    if max_batch < 1 or max_seq_len < 2:
        raise BackendError(f"tensorrt profile: max_batch must be >= 1 and max_seq_len >= 2 "
                           f"(got {max_batch}, {max_seq_len})")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    ob = max_batch if opt_batch is None else opt_batch
    op = max_seq_len // 2 if opt_past is None else opt_past
    if not 1 <= ob <= max_batch or not 1 <= opt_q <= max_seq_len or not 0 <= op <= max_seq_len - 1 \
            or op + opt_q > max_seq_len:
        raise BackendError(f"tensorrt profile: opt point batch={ob}, q={opt_q}, past={op} is outside "
                           f"batch 1..{max_batch}, past + q <= {max_seq_len}")
    ranges = {"batch": (1, ob, max_batch), "q": (1, opt_q, max_seq_len), "past": (0, op, max_seq_len - 1),
              "total": (1, op + opt_q, max_seq_len)}
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        mn, opt, mx = [], [], []
        for i, d in enumerate(_dims(vi)):
            if isinstance(d, int) and d > 0:
                r = (d, d, d)
            elif d in ranges:
                r = ranges[d]
            else:
                raise BackendError(f"tensorrt profile: input '{vi.name}' dim {i} is {d!r}; the step graph's dynamic "
                                   f"dims must be named {', '.join(DIM_RANGES)}")
            mn.append(r[0])
            opt.append(r[1])
            mx.append(r[2])
        out[vi.name] = (tuple(mn), tuple(opt), tuple(mx))
    return out


def _non_forward_prefixes(model: onnx.ModelProto) -> tuple[str, ...]:
    """`<ir node>/` of every ONNX node that is not part of an inlined model forward (processors, sampler)."""
    ids = set()
    for nd in model.graph.node:
        meta = {p.key: p.value for p in nd.metadata_props}
        if meta.get("dgopt.ir_node") and meta.get("dgopt.ir_op") not in ("forward", "input"):
            ids.add(meta["dgopt.ir_node"] + "/")
    return tuple(sorted(ids))


def _pin_fp32(trt, network, prefixes: tuple[str, ...]) -> int:
    floats = {trt.float32, trt.float16}
    if hasattr(trt, "bfloat16"):
        floats.add(trt.bfloat16)
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not prefixes or not layer.name.startswith(prefixes) or layer.num_outputs == 0:
            continue
        if any(layer.get_output(j).dtype not in floats for j in range(layer.num_outputs)):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        n += 1
    return n


def _parser_errors(parser) -> str:
    msgs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        name = getattr(e, "node_name", lambda: "")() or f"node #{e.node()}"
        op = getattr(e, "node_operator", lambda: "")()
        msgs.append(f"{name}{f' ({op})' if op else ''}: {e.desc()}")
    return "; ".join(msgs) or "unknown parser error"


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)


def build_engine(art_dir: str | Path, out: str | Path | None = None, *, precision: str | None = None,
                 max_batch: int | None = None, max_seq_len: int | None = None, opt_batch: int | None = None,
                 opt_past: int | None = None, workspace_gb: float | None = None,
                 timing_cache: str | Path | None = None, fp32_sampler: bool = True, check: bool = True,
                 verbose: bool = False) -> tuple[Path, dict]:
    """Build `out` (default `<art_dir>/engine.plan`) from the artifact's step graph; returns (engine path, metadata).

    `metadata` is what the manifest's `tensorrt` entry should hold: TensorRT `version`, the GPU's
    `compute_capability` [major, minor] (what `check_engine_compat` compares), device name, precision, the profile,
    the engine's sha256 and the build time. precision / max_batch / max_seq_len default to the artifact's `target`.
    With `check` the static check (`check_artifact`) runs first and any error stops the build before TensorRT does."""
    from dgopt.artifact import read_manifest, sha256_file

    art_dir = Path(art_dir)
    manifest = read_manifest(art_dir)
    target = manifest["target"]
    precision = precision or target.get("precision", "fp32")
    if precision not in ("fp32", "fp16", "bf16"):
        raise BackendError(f"tensorrt: precision must be fp32, fp16 or bf16, not {precision!r}")
    max_batch = int(max_batch or target["max_batch"])
    max_seq_len = int(max_seq_len or target["max_seq_len"])
    step = art_dir / manifest["step"]
    out = Path(out) if out else art_dir / ENGINE_FILE
    timing_cache = Path(timing_cache) if timing_cache else out.parent / TIMING_CACHE_FILE

    if check:
        from .check import check_artifact
        errors = [f for f in check_artifact(art_dir, precision) if f.severity == "error"]
        if errors:
            raise BackendError(f"step graph is not TensorRT-buildable ({len(errors)} error(s)); first: {errors[0]} "
                               f"(run `dgopt check {art_dir} --target tensorrt` for the full report)")

    graph = onnx.load(str(step), load_external_data=False)
    shapes = profile_shapes(graph, max_batch, max_seq_len, opt_batch, 1, opt_past)

    trt = import_tensorrt()
    import torch
    if not torch.cuda.is_available():
        raise BackendError("tensorrt: no CUDA device visible to torch; an engine is built on the GPU it will run on")
    cc = tuple(torch.cuda.get_device_capability())
    if precision == "bf16" and cc < (8, 0):
        raise BackendError(f"tensorrt: bf16 needs compute capability >= 8.0 (this GPU is {cc[0]}.{cc[1]}); use fp16")

    logger = make_logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(step)):
        raise BackendError(f"TensorRT's ONNX parser rejected {step.name}: {_parser_errors(parser)}")

    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    pinned = 0
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if precision != "fp32" and fp32_sampler:
        pinned = _pin_fp32(trt, network, _non_forward_prefixes(graph))
        if pinned:
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)

    profile = builder.create_optimization_profile()
    net_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for name in net_inputs:
        if name not in shapes:
            raise BackendError(f"tensorrt: network input '{name}' is not a graph input of {step.name}")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        errs = logger.errors()
        raise BackendError(f"TensorRT engine build failed: {errs[-1] if errs else 'no error message'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, plan)
    try:
        _write_atomic(timing_cache, config.get_timing_cache().serialize())
    except Exception as e:  # noqa: BLE001 - the cache only speeds up the next build
        log.warning("could not write the timing cache %s: %s", timing_cache, e)

    meta = {
        "version": trt.__version__,
        "compute_capability": [int(cc[0]), int(cc[1])],
        "device": torch.cuda.get_device_name(),
        "engine": out.name if out.parent == art_dir else str(out),
        "sha256": sha256_file(out),
        "precision": precision,
        "fp32_sampler_layers": pinned,
        "max_batch": max_batch,
        "max_seq_len": max_seq_len,
        "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in shapes.items()
                    if k in net_inputs},
        "timing_cache": str(timing_cache),
        "build_s": round(build_s, 3),
    }
    log.info("built %s (TensorRT %s, sm_%d%d, %s) in %.1fs", out, meta["version"], cc[0], cc[1], precision, build_s)
    return out, meta
