"""Build a TensorRT engine (`engine.plan`) from an artifact's `step.onnx`, for TensorRT 10 and 11 alike.

    builder = trt.Builder(logger)
    network = builder.create_network(1 << STRONGLY_TYPED)       # required on 10 for what follows; ignored on 11
    trt.OnnxParser(network, logger).parse_from_file(step.onnx)   # parser errors name the ONNX node
    config: TF32 cleared, a workspace limit, one optimization profile, a timing cache
    builder.build_serialized_network(network, config) -> engine.plan

Precision is strongly typed: it comes from the ONNX types, never from builder flags. TensorRT 11 removed the weak
typing API (BuilderFlag.FP16/BF16, PREFER/OBEY_PRECISION_CONSTRAINTS, ILayer.precision, set_output_type) and always
builds strongly typed; TensorRT 10 does so with the STRONGLY_TYPED network flag. So an fp16 engine is built from the
fp16 step graph that `target.precision: fp16` lowers (fp16 weights and KV cache, the mask clamped to the fp16 range
before its Cast, the logits cast to fp32 for the processors and sampler): one graph, the same on onnxruntime and
TensorRT, checkable on a CPU. bf16 needs a bf16 ONNX export, which dgopt does not write yet: refused.
TF32 is cleared for every engine: TensorRT enables it by default, and TF32 matmuls (10-bit mantissa inputs) change
greedy tokens on near-ties against the fp32 ONNX step, and would round the positions in the fp32 rotary matmul of
an fp16 forward. A missing API (a TensorRT outside 10.x/11.x) is a one-line BackendError naming it.

The optimization profile (`profile.py`) covers every dynamic input, from the manifest's strategy and target. The timing
cache lives in the user cache dir (`timing_cache_path`), keyed by TensorRT version and GPU, so the next build reuses
it wherever the artifact is written.

`tensorrt` is imported only inside `build_engine`; without it the call raises `BackendError("TensorRT not installed
...")`. Written against the documented TensorRT 10/11 API and tested against a stand-in of it (tests/test_tensorrt.py);
not run on a GPU yet."""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import onnx

from dgopt.errors import BackendError

from .profile import profile_shapes

__all__ = ["build_engine", "profile_shapes", "import_tensorrt", "make_logger", "ENGINE_FILE", "timing_cache_path",
           "graph_precision", "SUPPORTED_MAJORS"]
log = logging.getLogger("dgopt.tensorrt")

ENGINE_FILE = "engine.plan"
SUPPORTED_MAJORS = (10, 11)


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


def timing_cache_path(trt_version: str, compute_capability) -> Path:
    """Where builds on this machine share their timing cache: `$DGOPT_CACHE_DIR`, else `$XDG_CACHE_HOME/dgopt`, else
    `~/.cache/dgopt`, then `tensorrt/timing-<version>-sm<cc>.cache` (a cache is only valid for one TensorRT version on
    one GPU architecture)."""
    root = os.environ.get("DGOPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dgopt")
    ver = re.sub(r"[^0-9A-Za-z.]+", "_", str(trt_version))
    return Path(root) / "tensorrt" / f"timing-{ver}-sm{int(compute_capability[0])}{int(compute_capability[1])}.cache"


def graph_precision(model: onnx.ModelProto) -> str:
    """fp16 when the step's KV cache inputs are fp16 (the lowering's fp16 forward), else fp32."""
    kv = [vi for vi in model.graph.input if vi.name.startswith("past.")]
    types = {vi.type.tensor_type.elem_type for vi in kv}
    if types == {onnx.TensorProto.FLOAT16}:
        return "fp16"
    if types == {onnx.TensorProto.BFLOAT16}:
        return "bf16"
    return "fp32"


def _api(trt, path: str):
    """`trt.<path>`, or a one-line BackendError naming what this TensorRT lacks (never an AttributeError)."""
    obj = trt
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise BackendError(f"TensorRT {getattr(trt, '__version__', '?')} has no {path} (dgopt builds with "
                               f"TensorRT {' and '.join(f'{m}.x' for m in SUPPORTED_MAJORS)})")
    return obj


def _major(trt) -> int:
    try:
        major = int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        raise BackendError(f"TensorRT version {getattr(trt, '__version__', None)!r} is unreadable") from None
    if major not in SUPPORTED_MAJORS:
        raise BackendError(f"TensorRT {trt.__version__} is not supported (dgopt builds with TensorRT "
                           f"{' and '.join(f'{m}.x' for m in SUPPORTED_MAJORS)})")
    return major


def _network(trt, builder, major: int):
    """A strongly typed network: the flag is required on TensorRT 10 and accepted but ignored on 11 (always strong),
    where a binding without it is tolerated."""
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    st = getattr(flags, "STRONGLY_TYPED", None)
    if st is None and major < 11:
        _api(trt, "NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    return builder.create_network(0 if st is None else 1 << int(st))


def build_engine(art_dir: str | Path, out: str | Path | None = None, *, precision: str | None = None,
                 max_batch: int | None = None, max_seq_len: int | None = None, opt_batch: int | None = None,
                 opt_past: int | None = None, workspace_gb: float | None = None,
                 timing_cache: str | Path | None = None, check: bool = True,
                 verbose: bool = False) -> tuple[Path, dict]:
    """Build `out` (default `<art_dir>/engine.plan`) from the artifact's step graph; returns (engine path, metadata).

    `metadata` is what the manifest's `tensorrt` entry should hold: TensorRT `version`, the GPU's
    `compute_capability` [major, minor] (what `check_engine_compat` compares), device name, precision, the profile,
    the timing cache's path, the engine's sha256 and the build time. max_batch / max_seq_len default to the
    artifact's `target`; `precision`, when given, must be the step graph's (strongly typed: the graph decides).
    With `check` the static check (`check_artifact`) runs first and any error stops the build before TensorRT does."""
    from dgopt.artifact import read_manifest, sha256_file

    art_dir = Path(art_dir)
    manifest = read_manifest(art_dir)
    target = manifest["target"]
    step = art_dir / manifest["step"]
    graph = onnx.load(str(step), load_external_data=False)
    have = graph_precision(graph)
    precision = precision or target.get("precision", have)
    if precision not in ("fp32", "fp16", "bf16"):
        raise BackendError(f"tensorrt: precision must be fp32, fp16 or bf16, not {precision!r}")
    if precision == "bf16":
        raise BackendError("tensorrt: bf16 engines need a bf16 ONNX step graph, which dgopt does not export yet "
                           "(TensorRT takes precision from the graph's types); use fp16")
    if precision != have:
        raise BackendError(f"tensorrt: {step.name} is {have} but precision {precision} was asked; TensorRT builds "
                           f"strongly typed (precision comes from the ONNX types): compile with "
                           f"target.precision {precision}")
    max_batch = int(max_batch or target["max_batch"])
    max_seq_len = int(max_seq_len or target["max_seq_len"])
    out = Path(out) if out else art_dir / ENGINE_FILE

    if check:
        from .check import check_artifact
        errors = [f for f in check_artifact(art_dir, precision) if f.severity == "error"]
        if errors:
            raise BackendError(f"step graph is not TensorRT-buildable ({len(errors)} error(s)); first: {errors[0]} "
                               f"(run `dgopt check {art_dir} --target tensorrt` for the full report)")

    shapes = profile_shapes(graph, max_batch, max_seq_len, opt_batch, opt_past, manifest.get("strategy"))

    trt = import_tensorrt()
    major = _major(trt)
    import torch
    if not torch.cuda.is_available():
        raise BackendError("tensorrt: no CUDA device visible to torch; an engine is built on the GPU it will run on")
    cc = tuple(torch.cuda.get_device_capability())
    timing_cache = Path(timing_cache) if timing_cache else timing_cache_path(trt.__version__, cc)

    logger = make_logger(trt, verbose)
    builder = trt.Builder(logger)
    network = _network(trt, builder, major)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(step)):
        raise BackendError(f"TensorRT's ONNX parser rejected {step.name}: {_parser_errors(parser)}")

    config = builder.create_builder_config()
    config.clear_flag(_api(trt, "BuilderFlag.TF32"))
    if workspace_gb:
        config.set_memory_pool_limit(_api(trt, "MemoryPoolType.WORKSPACE"), int(workspace_gb * (1 << 30)))

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
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(timing_cache, config.get_timing_cache().serialize())
        cache_path = str(timing_cache.resolve())
    except Exception as e:  # noqa: BLE001 - the cache only speeds up the next build
        log.warning("could not write the timing cache %s: %s", timing_cache, e)
        cache_path = None

    meta = {
        "version": trt.__version__,
        "compute_capability": [int(cc[0]), int(cc[1])],
        "device": torch.cuda.get_device_name(),
        "engine": out.name if out.parent == art_dir else str(out),
        "sha256": sha256_file(out),
        "precision": precision,
        "strongly_typed": True,
        "tf32": False,
        "max_batch": max_batch,
        "max_seq_len": max_seq_len,
        "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in shapes.items()
                    if k in net_inputs},
        "timing_cache": cache_path,
        "build_s": round(build_s, 3),
    }
    log.info("built %s (TensorRT %s, sm_%d%d, %s) in %.1fs", out, meta["version"], cc[0], cc[1], precision, build_s)
    return out, meta
