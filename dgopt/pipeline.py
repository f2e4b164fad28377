"""The compiler driver: spec -> IR -> passes -> lowered step -> artifact. The whole pipeline is one readable list."""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import yaml

from .artifact import SCHEMA_VERSION, write_artifact
from .errors import BackendError, DgoptError, IRError, SpecError
from .ir import Graph, graph_from_dict, spec_with_graph, verify
from .passmgr import DumpInstrument, PassManager, VerifyInstrument
from .spec import DEFAULT_MAX_SEQ_LEN, Spec, StrategySpec, load_spec, spec_from_dict

__all__ = ["compile", "build_ir", "optimize", "pipeline_passes", "OPT_LEVELS"]
log = logging.getLogger("dgopt")
FALLBACK_DIR = "autoregressive"     # strategy.draft_max_batch: the nested artifact larger calls run


def _passes():
    from dgopt import passes
    return passes


# -O0 runs nothing (the baseline every pass is tested against); each level is a plain list of pass names.
OPT_LEVELS: dict[int, list[str]] = {
    0: [],
    1: ["eliminate_softmax_before_argmax", "eliminate_dead_nodes"],
    2: ["eliminate_softmax_before_argmax", "fuse_gumbel_sampling", "fuse_draft_top_k_sampling",
        "fuse_recycle_chain", "merge_forwards", "eliminate_dead_nodes"],
}


def pipeline_passes(opt_level: int = 2, disable: list[str] | tuple = ()) -> list:
    if opt_level not in OPT_LEVELS:
        raise SpecError(f"unknown optimisation level -O{opt_level} (0, 1 or 2)")
    registry = _passes().PASSES
    unknown = [d for d in disable if d not in registry]
    if unknown:
        raise SpecError(f"--disable-pass: unknown pass '{unknown[0]}' (known: {', '.join(registry)})")
    return [registry[n]() for n in OPT_LEVELS[opt_level] if n not in disable]


def build_ir(spec: Spec) -> Graph:
    if spec.graph is not None:
        try:
            g = graph_from_dict(spec.graph)
        except IRError as e:
            raise SpecError(f"spec field 'graph': {e}") from None
    else:
        from .strategies import expand
        g = expand(spec)
    try:
        verify(g)
    except IRError as e:
        raise SpecError(f"spec field 'graph': {e}") from None
    return g


def optimize(g: Graph, spec: Spec, opt_level: int = 2, disable=(), dump_dir: Path | None = None,
             verify_each: bool = False) -> tuple[Graph, list[tuple[str, bool]]]:
    instruments = []
    if verify_each:
        instruments.append(VerifyInstrument())
    if dump_dir is not None:
        instruments.append(DumpInstrument(dump_dir, spec.to_dict()))
    pm = PassManager(pipeline_passes(opt_level, disable), instruments, name=f"O{opt_level}")
    res = pm(g)
    verify(res.graph, where=f"after -O{opt_level}")
    return res.graph, pm.history


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers
    from .version import __version__
    return {"dgopt": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__}


def compile(spec: str | Path | Spec | dict, out_dir: str | Path, opt_level: int = 2, disable: list[str] = (),
            dump_passes: str | Path | None = None, verify_each: bool = False, overrides: list[str] | None = None,
            progress: Callable[[str], object] | None = None) -> Path:
    """Compile a spec (path, dict or Spec) into an artifact directory; returns its path.

    `progress(stage)` is called as a context manager around each long stage (the CLI shows a spinner)."""
    t0 = time.perf_counter()
    stage = progress or (lambda name: nullcontext())
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec, overrides)
    elif isinstance(spec, dict):
        spec = spec_from_dict(spec)
    if spec.target.precision != "fp32" and spec.target.device == "cpu":
        raise SpecError(f"spec field 'target.precision': {spec.target.precision} needs device 'cuda' "
                        "(onnxruntime's CPU kernels run fp32)")
    if spec.target.precision == "bf16":
        raise SpecError("spec field 'target.precision': bf16 ONNX export is not implemented (onnxruntime's CUDA EP "
                        "covers few bf16 kernels, and TensorRT takes precision from the graph's types); use fp16")
    if spec.target.forward == "contrib" and spec.target.backend == "tensorrt":
        raise SpecError("spec field 'target.forward': contrib writes onnxruntime contrib ops, which TensorRT's parser "
                        "does not know; use auto or direct with the tensorrt backend")
    for which, ms in (("model", spec.model), ("draft", spec.draft)):
        if ms is not None and ms.dtype != "fp32":
            raise SpecError(f"spec field '{which}.dtype': {ms.dtype} is not supported yet; use fp32 "
                            "(set target.precision for the lowered step)")
    with stage("building IR"):
        g0 = build_ir(spec)
    with stage(f"running passes (-O{opt_level})"):
        g, history = optimize(g0, spec, opt_level, disable, Path(dump_passes) if dump_passes else None, verify_each)

    from .models.hf import export_forward, load_model
    models = {n.attrs["model"] for n in g.find("forward") + g.find("draft_loop")}
    unknown = models - {"target", "draft"}
    if unknown:
        raise SpecError(f"spec field 'graph': forward node calls unknown model '{sorted(unknown)[0]}' "
                        "(target or draft)")
    with stage("loading model"):
        lm = load_model(spec.model, spec.resolve)
    kv_dtype = _kv_dtype(spec)
    lm.info["kv_dtype"] = kv_dtype
    dm = _load_draft(spec, stage) if spec.draft is not None else None
    spec = spec.model_copy(update={"target": spec.target.model_copy(
        update={"max_seq_len": _max_seq_len(spec, lm, dm)})})
    forwards = {}
    if models:
        with stage(f"exporting {lm.family} forward to ONNX"):
            forwards["target"] = (export_forward(lm, kv_dtype, **_forward_method(spec)), lm.info)
    else:
        forwards["target"] = (None, lm.info)
    if spec.draft is not None and spec.target.backend == "tensorrt":
        raise BackendError("target.backend tensorrt: draft models are not supported by the engine build yet")
    fused = "draft" in models   # a fused speculative step: the draft's forwards are inlined beside the target's
    if fused:
        if spec.draft is None:
            raise SpecError("spec field 'draft': the graph calls model 'draft' but the spec defines no draft model")
        with stage(f"exporting draft {dm.family} forward to ONNX"):
            forwards["draft"] = (export_forward(dm, dm.info["kv_dtype"], **_forward_method(spec)), dm.info)

    recycle = None
    # strategy recycle: the module's weights (and the target's frozen head) in the step
    if g.find("recycle_step") or g.find("recycle_chain") or g.find("recycle_loop"):
        if spec.recycle is None:
            raise SpecError("spec field 'recycle': the graph runs a recyclable module but the spec names none")
        from .models.recycle import for_spec
        with stage("loading recyclable module"):
            recycle, weights = for_spec(spec, lm)
            forwards["recycle"] = (None, weights)

    from dgopt.backends.onnx import lower_to_onnx
    with stage("lowering to ONNX"):
        step, io = lower_to_onnx(g, forwards, lm.info["vocab_size"])

    draft = None
    if spec.draft is not None and not fused:
        draft = _compile_draft(spec, opt_level, dm, stage)
        if spec.strategy.kind == "uag" and not (lm.tokenizer_dir and draft[1].tokenizer_dir):
            which = "model" if not lm.tokenizer_dir else "draft"
            raise SpecError(f"spec field '{which}': strategy uag translates between the two models' tokenizers, "
                            f"but the {'target' if which == 'model' else 'draft'} model has none (random-init "
                            "config?); give a model dir with tokenizer files")

    if spec.target.backend == "tensorrt":
        return _compile_tensorrt(spec, g, g0, history, step, io, lm, out_dir, opt_level, stage)
    extra, nested = ({"recycle": recycle} if recycle else {}), {}
    if 0 < spec.strategy.draft_max_batch < spec.target.max_batch:
        # larger calls run plain autoregressive decoding: its own artifact inside this one
        nested[FALLBACK_DIR] = spec.model_copy(update={"strategy": StrategySpec(), "recycle": None, "draft": None,
                                                       "graph": None})
        extra["fallback"] = {"dir": FALLBACK_DIR, "above_batch": spec.strategy.draft_max_batch}
    with stage("writing artifact"):
        out = _write_onnx_artifact(spec, g, g0, history, step, io, lm, dm, draft, out_dir, opt_level,
                                   extra or None, nested=nested)
    log.info("compiled %s in %.2fs", out, time.perf_counter() - t0)
    return out


def _write_onnx_artifact(spec, g, g0, history, step, io, lm, dm, draft, out_dir, opt_level, extra=None,
                         extra_files=(), nested=None) -> Path:
    """The artifact of a lowered step: manifest, step.onnx (and draft.onnx), the IR before and after the passes,
    tokenizers; `extra` adds manifest entries, `extra_files` copies files in (the TensorRT engine), `nested`
    {dir: spec} compiles artifacts into subdirectories (the autoregressive fallback)."""
    spec_dict = spec.to_dict()
    if spec.model.path is not None:   # make the recorded spec valid from inside the artifact
        spec_dict["model"]["path"] = str(spec.resolve(spec.model.path).resolve())
    document = spec.resolve(spec.strategy.document) if spec.strategy.document else None
    if document is not None:
        spec_dict["strategy"]["document"] = "document.txt"      # the artifact's copy
    if document is not None and not lm.tokenizer_dir:
        raise SpecError("spec field 'strategy.document': a text document needs a model with a tokenizer (this one "
                        "is a random-init config); set Decoder.document to token ids at run time instead")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dgopt_version": _versions()["dgopt"],
        "versions": _versions(),
        "created_unix": int(time.time()),
        # a document travels in the artifact (document.txt; the runtime encodes it once)
        "strategy": {**spec.strategy.model_dump(mode="json"), "document": "document.txt" if document else None},
        "sampling": spec.sampling.model_dump(mode="json"),
        "target": spec.target.model_dump(mode="json"),
        "model": {**lm.info, "source": lm.source},
        "pipeline": {"opt_level": opt_level, "passes": [{"name": n, "modified": m} for n, m in history],
                     "ir_fingerprint": g.fingerprint()},
        "io": io,
        "step": "step.onnx",
        "tokenizer": "tokenizer" if lm.tokenizer_dir else None,
        "tuned": spec.tuned,
    }
    manifest.update(extra or {})
    if dm is not None and draft is None:        # fused: the draft's forwards are inside step.onnx
        manifest["draft"] = {"fused": True, "model": {**dm.info, "source": dm.source}}
    if draft is not None:
        manifest["draft"] = {"step": "draft.onnx", "model": {**draft[1].info, "source": draft[1].source},
                             "io": draft[2], "ir_fingerprint": draft[3]}
        if spec.strategy.kind == "uag":
            manifest["draft"]["tokenizer"] = "draft_tokenizer"

    def fill(staging: Path):
        import onnx
        big = step.ByteSize() > 512 * 2**20
        onnx.save_model(step, str(staging / "step.onnx"), save_as_external_data=big,
                        location="step.onnx.data" if big else None, all_tensors_to_one_file=True)
        if draft is not None:
            onnx.save_model(draft[0], str(staging / "draft.onnx"))
        (staging / "ir.yaml").write_text(yaml.safe_dump(spec_with_graph(spec_dict, g), sort_keys=False))
        (staging / "ir.O0.yaml").write_text(yaml.safe_dump(spec_with_graph(spec_dict, g0), sort_keys=False))
        if lm.tokenizer_dir:
            _copy_tokenizer(lm.tokenizer_dir, staging / "tokenizer")
        if document is not None:
            (staging / "document.txt").write_text(document.read_text())
        if draft is not None and spec.strategy.kind == "uag":
            _copy_tokenizer(draft[1].tokenizer_dir, staging / "draft_tokenizer")
        for f in extra_files:
            shutil.copy2(f, staging / Path(f).name)
        for sub, sub_spec in (nested or {}).items():
            compile(sub_spec, staging / sub, opt_level)

    return write_artifact(Path(out_dir), fill, manifest)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                            or f.name in ("added_tokens.json",)):
            (dst / f.name).write_bytes(f.read_bytes())


def _forward_method(spec: Spec) -> dict:
    """export_forward's method: auto writes contrib ops for onnxruntime on the CPU only (the CUDA EP has the kernels
    but no GPU has run them here; TensorRT cannot parse them)."""
    return {"method": spec.target.forward,
            "contrib_ok": spec.target.backend == "onnx" and spec.target.device == "cpu"}


def _kv_dtype(spec: Spec) -> str:
    """The exported forward's dtype (weights, KV cache): fp16 for an fp16 target, on either backend (TensorRT builds
    strongly typed: the engine's precision is the graph's)."""
    return "float16" if spec.target.precision == "fp16" else "float32"


def _compile_draft(spec: Spec, opt_level: int, dm, stage):
    """The draft's own step graph, through the same passes: for greedy speculative decoding and uag k chained greedy
    steps (all k proposals in one call; uag's draft proposes greedily even when the target samples: its tokens
    are matched against the target's draws); for speculative sampling one step returning the draft's distribution q."""
    from dgopt.backends.onnx import lower_to_onnx
    from .models.hf import export_forward
    from .spec import SamplingSpec
    from .strategies.draft_chain import expand_draft_chain, expand_draft_probs
    sampled = spec.sampling.kind == "sample" and spec.strategy.kind == "speculative"
    dspec = spec.model_copy(update={"model": spec.draft, "draft": None, "graph": None,
                                    "strategy": spec.strategy.model_copy(update={"kind": "autoregressive"}),
                                    "sampling": spec.sampling.model_copy(update={"repetition_penalty": 1.0})
                                    if sampled else SamplingSpec(kind="greedy")})
    st = spec.strategy
    g0 = expand_draft_probs(dspec) if sampled else expand_draft_chain(
        dspec, st.k_max if st.k_schedule == "heuristic" else st.k, loop=st.draft_loop, confidence=st.confidence)
    g, _ = optimize(g0, dspec, opt_level)
    with stage(f"exporting draft {dm.family} forward to ONNX"):
        fwd = export_forward(dm, dm.info["kv_dtype"], **_forward_method(spec))
        step, io = lower_to_onnx(g, {"target": (fwd, dm.info)}, dm.info["vocab_size"])
    return step, dm, io, g.fingerprint()


def _max_seq_len(spec: Spec, lm, dm) -> int:
    """target.max_seq_len as given, or its default: 1024, less where the model (or a speculative draft, which sees
    the target's positions) has fewer positions. An explicit value above a model's positions is an error naming both
    limits; uag's draft counts its own tokens and stops at its limit at run time, so only speculative's is checked."""
    limits = {"the model's": lm.info["max_position_embeddings"]}
    if dm is not None and spec.strategy.kind == "speculative":
        limits["the draft's"] = dm.info["max_position_embeddings"]
    limits = {k: v for k, v in limits.items() if v > 0}
    want = spec.target.max_seq_len
    if want is None:
        return min([DEFAULT_MAX_SEQ_LEN, *limits.values()])
    if any(want > v for v in limits.values()):
        both = " and ".join(f"{k} max_position_embeddings {v}" for k, v in limits.items())
        raise SpecError(f"spec field 'target.max_seq_len': {want} exceeds {both}")
    return want


def _load_draft(spec: Spec, stage):
    from .models.hf import load_model
    with stage("loading draft model"):
        try:
            dm = load_model(spec.draft, spec.resolve)
        except DgoptError as e:
            raise type(e)(str(e).replace("model.", "draft.", 1)) from None
    dm.info["kv_dtype"] = _kv_dtype(spec)
    return dm


def _compile_tensorrt(spec, g, g0, history, step, io, lm, out_dir, opt_level, stage) -> Path:
    """The static check runs first and rejects what TensorRT's parser would; then the step graph that was checked
    (same passes, --disable-pass / --verify-each / --dump-passes applied once) is written as an ONNX artifact in a
    temp dir, the engine is built from it, and the final artifact (engine included, recorded in the manifest) is
    written atomically. Run here against a stand-in TensorRT only: TensorRT cannot be installed on these machines."""
    import tempfile
    from dgopt.backends.tensorrt import build_engine, check_onnx, is_available
    findings = check_onnx(step, spec.target.precision)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise BackendError(f"target.backend tensorrt: {len(errors)} node(s) TensorRT would reject; first: "
                           f"{errors[0].node} ({errors[0].op_type}): {errors[0].reason}")
    if not is_available():
        raise BackendError("target.backend tensorrt: TensorRT not installed (or no CUDA device); the lowered graph "
                           f"passes the static check ({len(findings)} warning(s), see `dgopt check`); "
                           "use target.backend onnx here")
    tmp = Path(tempfile.mkdtemp(prefix=".dgopt-trt-", dir=Path(out_dir).resolve().parent))
    try:
        art = _write_onnx_artifact(spec, g, g0, history, step, io, lm, None, None, tmp / "onnx", opt_level)
        with stage("building TensorRT engine"):
            plan, meta = build_engine(art, tmp / "engine.plan", precision=spec.target.precision,
                                      max_batch=spec.target.max_batch, max_seq_len=spec.target.max_seq_len)
        with stage("writing artifact"):
            return _write_onnx_artifact(spec, g, g0, history, step, io, lm, None, None, out_dir, opt_level,
                                        extra={"tensorrt": {**meta, "engine": "engine.plan"}}, extra_files=[plan])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
