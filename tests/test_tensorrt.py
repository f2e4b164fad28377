"""TensorRT backend: the static support check (runs everywhere), the build flow against a stand-in `tensorrt` module,
engine-compatibility checks, and real engine build + run tests that skip unless TensorRT and a CUDA GPU are present."""
import enum
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import PROMPTS, TINY, tiny_spec
from onnx import TensorProto, helper, numpy_helper

import dgopt
from dgopt.backends.tensorrt import (TOPK_MAX_K, Finding, build_engine, check_artifact, check_engine_compat,
                                     check_onnx, format_op_table, format_report, is_available, lookup, op_inventory,
                                     profile_shapes)
from dgopt.errors import ArtifactError, BackendError

FAMILIES = ["llama", "gpt2", "qwen2"]
SAMPLING = {
    "greedy": {"kind": "greedy"},
    "sample": {"kind": "sample", "temperature": 0.8, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
               "repetition_penalty": 1.1, "noise": "precomputed"},
}


@pytest.fixture(scope="session")
def artifacts(artifacts):
    """The step graphs TensorRT gets: for the tensorrt backend `auto` writes the plain direct forward (Llama, Qwen2)
    or traces it (GPT-2); the contrib forward `auto` picks for onnxruntime on the CPU uses onnxruntime's own ops."""
    def get(family="llama", opt_level=2, **sections):
        target = sections.get("target", {})
        if target.get("device") != "cuda" and "forward" not in target:
            sections["target"] = {**target, "forward": "traced" if family == "gpt2" else "direct"}
        return artifacts(family, opt_level, **sections)
    return get


def errors(findings):
    return [f for f in findings if f.severity == "error"]


def step(art) -> onnx.ModelProto:
    return onnx.load(str(art / "step.onnx"))


# -- (a) the shipped graphs pass ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_shipped_step_graphs_have_no_errors(artifacts, family, opt_level, sampling):
    art = artifacts(family, opt_level, sampling=SAMPLING[sampling])
    for precision in ("fp32", "fp16", "bf16"):
        found = check_artifact(art, precision)
        assert errors(found) == [], format_report(found)
        assert all(isinstance(f, Finding) for f in found)
    ops = op_inventory(step(art))
    assert all(lookup(op) is not None and lookup(op).supported for op in ops), ops
    if sampling == "sample":
        assert "TopK" in ops and "ScatterElements" in ops
        names = {n.name for n in step(art).graph.node}
        # -O0: inverse-CDF multinomial (CumSum + compare); -O2: Gumbel-max, ArgMax(x + g)
        assert ("sampler/multinomial/CumSum" in names) == (opt_level == 0)
        assert ("sampler/gumbel_argmax/ArgMax" in names) == (opt_level == 2)


def test_sampler_ops_and_precision_warnings(artifacts):
    art = artifacts("llama", 0, sampling=SAMPLING["sample"])
    ops = op_inventory(step(art))
    for op in ("TopK", "CumSum", "ScatterElements", "ReduceSum", "ReduceMax", "And", "Cast", "Min"):
        assert op in ops, op
    assert "Multinomial" not in ops
    fp32 = check_artifact(art, "fp32")
    assert fp32 == [], format_report(fp32)
    fp16 = check_artifact(art, "fp16")           # strongly typed: an fp32 graph builds an fp32 engine
    assert [(f.node, f.rule, f.severity) for f in fp16] == [("(model)", "precision", "warning")]
    assert "target.precision fp16" in fp16[0].reason
    table = format_op_table(step(art))
    assert "TopK" in table and "supported" in table


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_step_graph_is_clean_and_an_unclamped_mask_cast_is_flagged(artifacts, family):
    """The fp16 lowering clamps each fp32 mask before its Cast to fp16 (no finding); remove the clamp and the check
    names the Cast."""
    art = artifacts(family, 2, sampling=SAMPLING["sample"], target={"device": "cuda", "precision": "fp16"})
    m = step(art)
    assert check_artifact(art) == [], format_report(check_artifact(art))
    cast = next(n for n in m.graph.node if n.op_type == "Cast" and n.input[0].endswith("/Max:0"))
    mx = next(n for n in m.graph.node if n.output[0] == cast.input[0])
    cast.input[0] = mx.input[0]                                   # mask -> Cast(fp16) directly
    found = check_onnx(m, "fp16")
    assert [(f.node, f.rule) for f in found] == [(cast.name, "precision")], format_report(found)


def test_precision_defaults_to_the_artifact_target(artifacts):
    art = artifacts("gpt2", 2, sampling=SAMPLING["greedy"])
    assert check_artifact(art) == []                         # the artifact targets fp32
    assert check_artifact(art / "step.onnx")                  # a bare .onnx file is checked at fp16: mask warning
    with pytest.raises(ValueError):
        check_onnx(step(art), precision="int8")


# -- (b) what the check must catch --------------------------------------------------------------------------------
def _plant(model: onnx.ModelProto, nodes, inits=(), inputs=()) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    m.graph.input.extend(inputs)
    return m


def _logits(model) -> str:
    """A processed-logits value [batch, V] of a sampling graph (the first input of the sampler's TopK)."""
    return next(n.input[0] for n in model.graph.node if n.op_type == "TopK")


@pytest.fixture(scope="module")
def sample_o2(artifacts):
    return step(artifacts("llama", 2, sampling=SAMPLING["sample"]))


def test_planted_multinomial_is_an_error(sample_o2):
    m = _plant(sample_o2, [helper.make_node("Multinomial", [_logits(sample_o2)], ["planted:0"],
                                            name="planted/Multinomial", sample_size=1)])
    found = check_onnx(m)
    errs = errors(found)
    assert [(f.node, f.op_type, f.rule) for f in errs] == [("planted/Multinomial", "Multinomial", "unsupported-op")]
    report = format_report(found)
    line = next(ln for ln in report.splitlines() if "planted/Multinomial" in ln)
    assert line.startswith("error") and "not supported" in line
    assert report.splitlines()[-1].endswith("(not buildable)")


def test_planted_topk_over_the_limit_is_an_error(sample_o2):
    wide = helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["batch", 8192])
    k = numpy_helper.from_array(np.array([TOPK_MAX_K + 1], np.int64), "planted/k")
    m = _plant(sample_o2, [helper.make_node("TopK", ["wide", "planted/k"], ["planted:v", "planted:i"],
                                            name="planted/TopK", axis=-1, largest=1, sorted=1)], [k], [wide])
    errs = errors(check_onnx(m))
    assert [(f.node, f.rule) for f in errs] == [("planted/TopK", "topk-k")]
    assert f"K = {TOPK_MAX_K + 1}" in errs[0].reason and str(TOPK_MAX_K) in errs[0].reason


def test_planted_topk_with_unsorted_output_or_k_above_dim_is_an_error(sample_o2):
    x = _logits(sample_o2)
    k = numpy_helper.from_array(np.array([400], np.int64), "planted/k400")       # V = 320
    m = _plant(sample_o2, [helper.make_node("TopK", [x, "planted/k400"], ["p:v", "p:i"], name="planted/TopK",
                                            sorted=0)], [k])
    rules = sorted(f.rule for f in errors(check_onnx(m)))
    assert rules == ["attribute", "topk-k"]


def test_planted_runtime_k_is_a_warning_and_runtime_axes_are_errors(sample_o2):
    """TensorRT >= 8.6 takes a run-time TopK K (the parser feeds K to ITopKLayer as a tensor), so that is a warning;
    CumSum's axis and Reduce*'s axes must be initializers and Unsqueeze's axes must fold to a constant: errors."""
    x = _logits(sample_o2)
    nodes = [
        helper.make_node("Shape", ["attn_mask"], ["p:shape"], name="planted/Shape"),            # [B,1,q,total]
        helper.make_node("Gather", ["p:shape", "planted/three"], ["p:total"], name="planted/Gather", axis=0),
        helper.make_node("Min", ["p:total", "planted/four"], ["p:k"], name="planted/Min"),
        helper.make_node("TopK", [x, "p:k"], ["p:v", "p:i"], name="planted/TopK"),
        helper.make_node("Sub", ["p:k", "p:k"], ["p:zero"], name="planted/Sub"),                # run-time 0
        helper.make_node("CumSum", [x, "p:zero"], ["p:cum"], name="planted/CumSum"),
        helper.make_node("ReduceSum", [x, "p:k"], ["p:sum"], name="planted/ReduceSum"),
        helper.make_node("Unsqueeze", [x, "p:zero"], ["p:unsq"], name="planted/Unsqueeze"),
    ]
    inits = [numpy_helper.from_array(np.array([3], np.int64), "planted/three"),
             numpy_helper.from_array(np.array([4], np.int64), "planted/four")]
    found = check_onnx(_plant(sample_o2, nodes, inits))
    by = {(f.node, f.severity, f.rule) for f in found}
    assert ("planted/TopK", "warning", "topk-k") in by
    assert ("planted/CumSum", "error", "initializer") in by
    assert ("planted/ReduceSum", "error", "initializer") in by
    assert ("planted/Unsqueeze", "error", "constant") in by
    cum = next(f for f in found if f.node == "planted/CumSum")
    assert "planted/Sub" in cum.reason                                   # names the node that computes it
    assert not [f for f in errors(found) if not f.node.startswith("planted/")]


def test_constant_folded_axes_pass(sample_o2):
    """Unsqueeze axes computed from constants only (Constant -> Neg) resolve at build time: no error."""
    x = _logits(sample_o2)
    nodes = [helper.make_node("Constant", [], ["p:c"], name="planted/Constant",
                              value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Neg", ["p:c"], ["p:axes"], name="planted/Neg"),
             helper.make_node("Unsqueeze", [x, "p:axes"], ["p:u"], name="planted/Unsqueeze"),
             helper.make_node("CumSum", [x, "p:c"], ["p:cs"], name="planted/CumSum")]       # Constant = weights
    assert errors(check_onnx(_plant(sample_o2, nodes))) == []


def test_planted_bool_compare_and_unknown_op_are_errors(sample_o2):
    """Equal takes no BOOL in TensorRT (And/Where/Cast do); an op outside the matrix would need a plugin."""
    cond = next(n.output[0] for n in sample_o2.graph.node if n.op_type == "Less")
    nodes = [helper.make_node("Equal", [cond, cond], ["p:eq"], name="planted/Equal"),
             helper.make_node("And", [cond, cond], ["p:and"], name="planted/And"),
             helper.make_node("FancyOp", [cond], ["p:f"], name="planted/FancyOp", domain="com.example")]
    errs = {(f.node, f.rule) for f in errors(check_onnx(_plant(sample_o2, nodes)))}
    assert errs == {("planted/Equal", "dtype"), ("planted/FancyOp", "not-in-matrix")}


@pytest.mark.parametrize("opt_level", [0, 2])
def test_in_graph_noise_warns_that_the_seed_is_ignored(artifacts, opt_level):
    art = artifacts("llama", opt_level, sampling={**SAMPLING["sample"], "noise": "in_graph"})
    found = check_artifact(art, "fp32")
    assert errors(found) == [], format_report(found)
    seed = [f for f in found if f.rule == "seed-ignored"]
    assert len(seed) == 1 and seed[0].severity == "warning" and seed[0].op_type == "RandomUniformLike"
    assert seed[0].node.startswith("sampler/random_")
    assert "precomputed" in seed[0].reason


def test_full_vocabulary_top_p_exceeds_the_topk_limit(artifacts):
    """top-p lowers to a full sort (TopK with K = V): at a 4096-token vocabulary (code-tiny's) TensorRT rejects it."""
    cfg = dict(TINY["llama"], vocab_size=4096)
    art = artifacts("llama", 2, model={"config": cfg, "seed": 0}, sampling={"kind": "sample", "top_p": 0.9})
    errs = errors(check_artifact(art, "fp16"))
    assert [(f.node, f.rule) for f in errs] == [("sampler/top_p/TopK", "topk-k")]
    assert "K = 4096" in errs[0].reason and "top-p" in errs[0].reason


def test_report_format():
    fs = [Finding("a/TopK", "TopK", "warning", "w"), Finding("b/Multinomial", "Multinomial", "error", "e")]
    lines = format_report(fs).splitlines()
    assert lines[0].startswith("error") and "b/Multinomial (Multinomial): e" in lines[0]
    assert lines[1].startswith("warning") and "a/TopK (TopK): w" in lines[1]
    assert lines[2] == "TensorRT 10.15 check: 1 error, 1 warning (not buildable)"
    assert format_report([]) == "TensorRT 10.15 check: 0 errors, 0 warnings (ok)"


def test_matrix_facts():
    assert not lookup("Multinomial").supported
    assert lookup("RandomUniformLike").seed_ignored and lookup("RandomUniform").seed_ignored
    assert lookup("CumSum").initializer and lookup("ReduceSum").initializer
    assert "BOOL" in lookup("Where").types and "BOOL" not in lookup("ScatterElements").types
    assert "BOOL" not in lookup("Equal").types and "INT64" in lookup("ReduceSum").types
    assert lookup("TopK").attrs["sorted"] == (1, (1,)) and TOPK_MAX_K == 3840
    assert lookup("Foo") is None and lookup("Add", "com.microsoft") is None


# -- build flow, profile, compat: no TensorRT needed -------------------------------------------------------------
def test_profile_shapes_cover_every_dynamic_input(artifacts):
    art = artifacts("llama", 2, sampling=SAMPLING["sample"])
    shapes = profile_shapes(art / "step.onnx", max_batch=4, max_seq_len=64)
    assert set(shapes) == {i.name for i in step(art).graph.input}
    # past <= 3S + W: committed tokens, padding and holes below 3S (slots.py compacts), plus one step's slot
    assert shapes["input_ids"] == ((1, 1), (4, 1), (4, 65))
    assert shapes["attn_mask"] == ((1, 1, 1, 1), (4, 1, 1, 33), (4, 1, 65, 193 + 65))
    assert shapes["past.0.key"] == ((1, 2, 0, 16), (4, 2, 32, 16), (4, 2, 193, 16))
    assert shapes["gumbel"] == ((1, 320), (4, 320), (4, 320))
    with pytest.raises(BackendError):
        profile_shapes(art / "step.onnx", max_batch=4, max_seq_len=64, opt_past=64)


def _spec_variants():
    """Every shipped spec, and one constructed spec per variant the runtime feeds differently."""
    shipped = sorted(Path(__file__).resolve().parents[1].glob("specs/*.yaml"))
    built = {"lookahead-sample": ("lookahead.yaml", ["sampling.kind=sample"]),
             "speculative-constant": ("speculative.yaml", ["strategy.k_schedule=constant", "strategy.k=3"]),
             "speculative-unfused": ("speculative.yaml", ["strategy.fused=false"])}
    return [pytest.param(str(p), [], id=p.stem) for p in shipped] + \
        [pytest.param(str(shipped[0].parent / f), ov, id=k) for k, (f, ov) in built.items()]


def _fed_shapes(sess, graph):
    """Wrap sess.run to record every input shape it is fed (the KV cache included)."""
    seen = []
    orig = sess.run

    def run(feeds, cache):
        allf = dict(feeds)
        if sess.past:
            allf.update(zip(sess.past["tensors"], cache))
        seen.extend((n, tuple(v.shape if isinstance(v.shape, tuple) else v.shape())) for n, v in allf.items())
        return orig(feeds, cache)
    sess.run = run
    return seen


@pytest.mark.parametrize("spec,overrides", _spec_variants())
def test_every_spec_gets_a_profile_that_holds_what_the_runtime_feeds(spec, overrides, tmp_path):
    """Each step graph (and draft step graph) of every shipped spec gets a complete profile (no unknown dynamic dim),
    and a ragged batch plus single rows generated up to max_seq_len stay inside it."""
    S, B = 32, 3
    # draft_max_batch 0: the ragged batch runs the spec's own step graph, not the nested autoregressive fallback
    art = dgopt.compile(spec, tmp_path / "a", overrides=[f"target.max_seq_len={S}", f"target.max_batch={B}",
                                                         "strategy.draft_max_batch=0"] + overrides)
    dec = dgopt.load(art)
    graphs = {"step": (dec.session, art / dec.manifest["step"])}
    if dec.draft_session is not None:
        graphs["draft"] = (dec.draft_session, art / dec.manifest["draft"]["step"])
    profiles, fed = {}, {}
    for k, (sess, path) in graphs.items():
        profiles[k] = profile_shapes(path, B, S, strategy=dec.manifest["strategy"])
        assert set(profiles[k]) == {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
        fed[k] = _fed_shapes(sess, path)
    rows = [list(range(5, 9)), list(range(20, 32)), list(range(50, 70))]
    for r in rows:
        dec.generate(r, max_new_tokens=S, seed=1)
    dec.generate(rows, max_new_tokens=S, seed=1)
    for k in graphs:
        assert fed[k]
        for name, shape in fed[k]:
            mn, _, mx = profiles[k][name]
            assert all(lo <= d <= hi for lo, d, hi in zip(mn, shape, mx)), (k, name, shape, mn, mx)


def test_every_implemented_strategy_kind_has_step_widths():
    from dgopt.backends.tensorrt import dim_ranges, step_widths
    from dgopt.spec import IMPLEMENTED_STRATEGIES, StrategySpec
    for kind in IMPLEMENTED_STRATEGIES:
        w = step_widths(StrategySpec(kind=kind).model_dump(mode="json"))
        assert all(v >= 1 for v in w.values()), (kind, w)
    with pytest.raises(BackendError, match="strategy kind 'bogus' has no step widths"):
        step_widths({"kind": "bogus"})
    with pytest.raises(BackendError, match="input 'x' has dynamic dim 'weird'"):
        dim_ranges({"batch", "weird"}, None, 2, 64, where={"weird": "x"})
    with pytest.raises(BackendError, match="strategy 'autoregressive' has no guesses"):
        dim_ranges({"guesses"}, None, 2, 64)


def test_engine_compat_is_checked_against_the_manifest():
    m = {"tensorrt": {"version": "10.15.1.29", "compute_capability": [8, 0]}}
    check_engine_compat(m, trt_version="10.15.1.29", compute_capability=(8, 0))
    with pytest.raises(ArtifactError, match=r"TensorRT 10\.15\.1\.29 but TensorRT 10\.14\.1\.48") as e:
        check_engine_compat(m, trt_version="10.14.1.48", compute_capability=(8, 0))
    assert "\n" not in str(e.value)
    with pytest.raises(ArtifactError, match=r"compute capability 8\.0 but this GPU is 9\.0") as e:
        check_engine_compat(m, trt_version="10.15.1.29", compute_capability=(9, 0))
    assert "\n" not in str(e.value)
    with pytest.raises(ArtifactError, match="no TensorRT engine"):
        check_engine_compat({}, trt_version="10.15.1.29", compute_capability=(8, 0))


def _fake_tensorrt(fail_parse=False, version="11.4.0.12", drop=()):
    """A stand-in for the TensorRT Python API objects build_engine touches, recording what it is asked. It models
    TensorRT 11 by default: no weak typing (BuilderFlag.FP16/BF16/PREFER_PRECISION_CONSTRAINTS, ILayer.precision,
    set_output_type are gone), STRONGLY_TYPED accepted and ignored; version "10.x" adds the weak-typing API back
    (build_engine must not use it either way). `drop` removes further names ("BuilderFlag.TF32", ...)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    ten = version.startswith("10.")
    trt.float32, trt.float16, trt.bfloat16, trt.int64, trt.int32, trt.bool = "f32", "f16", "bf16", "i64", "i32", "b"
    flags = ["TF32", "DEBUG", "EDITABLE_TIMING_CACHE"]
    flags += ["FP16", "BF16", "PREFER_PRECISION_CONSTRAINTS"] if ten else []
    flags = [f for f in flags if f"BuilderFlag.{f}" not in drop]
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", " ".join(flags))
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE")
    if "NetworkDefinitionCreationFlag.STRONGLY_TYPED" not in drop:
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
    rec = trt.rec = {"set": set(), "cleared": set(), "profile": {}, "network_flags": None}

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self):
            pass

    class T:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.num_inputs = flags, [], 0

        def get_input(self, i):
            return self.inputs[i]

    class Error:
        def desc(self):
            return "planted failure"

        def node(self):
            return 3

        def node_name(self):
            return "sampler/top_p/TopK"

        def node_operator(self):
            return "TopK"

    class OnnxParser:
        def __init__(self, network, logger):
            self.net, self.num_errors = network, 0

        def parse_from_file(self, path):
            if fail_parse:
                self.num_errors = 1
                return False
            rec["parsed"] = open(path, "rb").read()
            g = onnx.load(path, load_external_data=False).graph
            self.net.inputs = [T(i.name) for i in g.input]
            self.net.num_inputs = len(self.net.inputs)
            return True

        def get_error(self, i):
            return Error()

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            rec["profile"][name] = (tuple(mn), tuple(opt), tuple(mx))

    class Cache:
        def __init__(self, data=b""):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+1"

    class Config:
        def set_flag(self, f):
            rec["set"].add(f.name)

        def clear_flag(self, f):
            rec["cleared"].add(f.name)

        def set_memory_pool_limit(self, pool, n):
            rec["workspace"] = n

        def add_optimization_profile(self, p):
            rec["profiles"] = rec.get("profiles", 0) + 1

        def create_timing_cache(self, data):
            rec["cache_in"] = bytes(data)
            self.cache = Cache(data)
            return self.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            rec["network_flags"] = flags
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"PLAN"

    trt.ILogger, trt.OnnxParser, trt.Builder = ILogger, OnnxParser, Builder
    return trt


def _fake_gpu(monkeypatch, trt, tmp_path=None):
    import torch
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    if tmp_path is not None:
        monkeypatch.setenv("DGOPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("version", ["10.15.1.29", "11.4.0.12"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_flow_against_a_stand_in_tensorrt(artifacts, tmp_path, monkeypatch, version, precision):
    """Strongly typed on both majors, TF32 cleared, no precision flag; the profile covers every input; the timing
    cache lands in the user cache dir, keyed by version and GPU, and is read back by the next build."""
    target = {"device": "cuda", "precision": precision}
    art = artifacts("llama", 0, sampling=SAMPLING["sample"], target=target)
    trt = _fake_tensorrt(version=version)
    _fake_gpu(monkeypatch, trt, tmp_path)
    plan, meta = build_engine(art, tmp_path / "engine.plan", max_batch=2, max_seq_len=32, workspace_gb=1)
    assert plan.read_bytes() == b"PLAN"
    assert trt.rec["network_flags"] == 1 and trt.rec["set"] == set() and trt.rec["cleared"] == {"TF32"}
    assert trt.rec["profiles"] == 1 and set(trt.rec["profile"]) == {i.name for i in step(art).graph.input}
    assert trt.rec["profile"]["past.1.value"] == ((1, 2, 0, 16), (2, 2, 16, 16), (2, 2, 97, 16))
    cache = tmp_path / "cache" / "tensorrt" / f"timing-{version}-sm89.cache"
    assert meta["timing_cache"] == str(cache) and cache.read_bytes() == b"+1"
    assert meta["version"] == version and meta["compute_capability"] == [8, 9] and meta["precision"] == precision
    assert meta["tf32"] is False and meta["strongly_typed"] and meta["profile"]["input_ids"]["max"] == [2, 33]
    build_engine(art, tmp_path / "engine2.plan")
    assert trt.rec["cache_in"] == b"+1" and cache.read_bytes() == b"+1+1"        # reused, then grown


def test_build_refuses_a_precision_the_graph_does_not_have(artifacts, tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, _fake_tensorrt(), tmp_path)
    art = artifacts("llama", 2, sampling=SAMPLING["greedy"])                      # fp32 graph
    with pytest.raises(BackendError, match="step.onnx is fp32 but precision fp16 was asked.*strongly typed"):
        build_engine(art, tmp_path / "e.plan", precision="fp16")
    with pytest.raises(BackendError, match="bf16 engines need a bf16 ONNX step graph"):
        build_engine(art, tmp_path / "e.plan", precision="bf16")


@pytest.mark.parametrize("version,drop,what", [
    ("11.4.0.12", ("BuilderFlag.TF32",), "BuilderFlag.TF32"),
    ("10.15.1.29", ("NetworkDefinitionCreationFlag.STRONGLY_TYPED",), "NetworkDefinitionCreationFlag.STRONGLY_TYPED"),
    ("9.3.0.1", (), "TensorRT 9.3.0.1 is not supported"),
    ("12.0.0.1", (), "TensorRT 12.0.0.1 is not supported"),
])
def test_a_missing_tensorrt_feature_is_a_one_line_backend_error(artifacts, tmp_path, monkeypatch, version, drop,
                                                               what):
    _fake_gpu(monkeypatch, _fake_tensorrt(version=version, drop=drop), tmp_path)
    with pytest.raises(BackendError) as e:
        build_engine(artifacts("llama", 2, sampling=SAMPLING["greedy"]), tmp_path / "e.plan")
    assert what in str(e.value) and "\n" not in str(e.value)


def test_a_11_binding_without_the_strongly_typed_flag_builds(artifacts, tmp_path, monkeypatch):
    """TensorRT 11 is always strongly typed: a binding that drops the deprecated flag still builds (flags 0)."""
    trt = _fake_tensorrt(drop=("NetworkDefinitionCreationFlag.STRONGLY_TYPED",))
    _fake_gpu(monkeypatch, trt, tmp_path)
    build_engine(artifacts("llama", 2, sampling=SAMPLING["greedy"]), tmp_path / "e.plan")
    assert trt.rec["network_flags"] == 0


def test_the_static_check_runs_before_the_builder(artifacts, tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, _fake_tensorrt(), tmp_path)
    big = artifacts("llama", 2, model={"config": dict(TINY["llama"], vocab_size=4096), "seed": 0},
                    sampling={"kind": "sample", "top_p": 0.9})
    with pytest.raises(BackendError, match="not TensorRT-buildable.*sampler/top_p/TopK"):
        build_engine(big, tmp_path / "big.plan")


def test_build_reports_parser_errors(artifacts, tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, _fake_tensorrt(fail_parse=True), tmp_path)
    with pytest.raises(BackendError, match=r"parser rejected step\.onnx: sampler/top_p/TopK \(TopK\): planted"):
        build_engine(artifacts("llama", 0, sampling=SAMPLING["sample"]), tmp_path / "e.plan", precision="fp32")


def test_build_without_tensorrt_says_so(artifacts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # import tensorrt -> ImportError
    with pytest.raises(BackendError, match="TensorRT not installed"):
        build_engine(artifacts("gpt2", 2, sampling=SAMPLING["greedy"]), tmp_path / "e.plan", check=False)
    assert not is_available()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_compile_tensorrt_builds_the_checked_graph_with_the_pass_options(tmp_path, monkeypatch, precision):
    """target.backend tensorrt: --disable-pass, --verify-each and --dump-passes apply to the graph the engine is
    built from (it is the artifact's step.onnx, byte for byte: no second compile), and the manifest's timing cache
    outlives the build's temp dir."""
    trt = _fake_tensorrt()
    _fake_gpu(monkeypatch, trt, tmp_path)
    spec = tiny_spec("llama", sampling=SAMPLING["sample"], target={"backend": "tensorrt", "device": "cuda",
                                                                   "precision": precision, "max_batch": 2})
    dump = tmp_path / "dump"
    art = dgopt.compile(spec, tmp_path / "art", opt_level=2, disable=["fuse_gumbel_sampling"], dump_passes=dump,
                        verify_each=True)
    manifest = json.loads((art / "manifest.json").read_text())
    passes = [p["name"] for p in manifest["pipeline"]["passes"]]
    assert "fuse_gumbel_sampling" not in passes and "eliminate_dead_nodes" in passes
    assert any(dump.iterdir())
    assert trt.rec["parsed"] == (art / "step.onnx").read_bytes()
    names = {n.name for n in step(art).graph.node}
    assert "sampler/multinomial/CumSum" in names and "sampler/gumbel_argmax/ArgMax" not in names
    info = manifest["tensorrt"]
    assert info["engine"] == "engine.plan" and (art / "engine.plan").read_bytes() == b"PLAN"
    assert Path(info["timing_cache"]).is_file() and str(tmp_path / "cache") in info["timing_cache"]
    assert info["precision"] == precision == manifest["target"]["precision"]
    assert not list(tmp_path.glob(".dgopt-trt-*"))


# -- (c) real engine: only with TensorRT and a CUDA GPU -------------------------------------------------------------
needs_trt = pytest.mark.skipif(not is_available(), reason="TensorRT not installed (or no CUDA device)")


def _trt_decoder(art, plan, meta):
    from dgopt.backends.tensorrt import TrtSession
    dec = dgopt.load(art)
    manifest = dict(dec.manifest, tensorrt=meta)
    dec.session = TrtSession(art, manifest, engine=plan)
    return dec


@needs_trt
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_greedy_tokens_match_onnx_cpu(artifacts, tmp_path, family):
    art = artifacts(family, 2, sampling=SAMPLING["greedy"])
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]]              # ragged: left padding, fully masked rows
    ref = dgopt.load(art).generate(rows, max_new_tokens=24).ids
    plan, meta = build_engine(art, tmp_path / "engine.plan", precision="fp32", max_batch=4, max_seq_len=64)
    dec = _trt_decoder(art, plan, meta)
    assert dec.generate(rows, max_new_tokens=24).ids == ref
    assert dec.generate(PROMPTS[4], max_new_tokens=24).ids == dgopt.load(art).generate(PROMPTS[4], 24).ids


@needs_trt
def test_engine_sampling_with_precomputed_noise_matches_onnx_cpu(artifacts, tmp_path):
    art = artifacts("llama", 2, sampling=SAMPLING["sample"])
    ref = dgopt.load(art).generate(PROMPTS[:2], max_new_tokens=16, seed=7).ids
    plan, meta = build_engine(art, tmp_path / "engine.plan", precision="fp32", max_batch=2, max_seq_len=64)
    assert _trt_decoder(art, plan, meta).generate(PROMPTS[:2], max_new_tokens=16, seed=7).ids == ref


@needs_trt
def test_engine_fp16_runs_finite_and_is_compatible(artifacts, tmp_path):
    """fp16 engine from the fp16 step graph: a ragged batch (fully masked left-padding rows) gives finite logits and
    KV (the mask is clamped to the fp16 range before its Cast), tokens in range, and the compat check holds."""
    art = artifacts("llama", 0, sampling=SAMPLING["sample"], target={"device": "cuda", "precision": "fp16"})
    plan, meta = build_engine(art, tmp_path / "engine.plan", max_batch=2, max_seq_len=64)
    assert meta["precision"] == "fp16"
    check_engine_compat({"tensorrt": meta})
    dec = _trt_decoder(art, plan, meta)
    _assert_first_step_finite(dec)
    res = dec.generate(PROMPTS[:2], max_new_tokens=8, seed=1)
    assert all(0 <= t < TINY["llama"]["vocab_size"] for row in res.ids for t in row)
    with pytest.raises(ArtifactError):
        check_engine_compat({"tensorrt": dict(meta, version="0.0.0")})


def _assert_first_step_finite(dec):
    from test_fp16 import ragged_first_step
    out, cache = ragged_first_step(dec.session, TINY["llama"]["vocab_size"])
    for k, v in list(out.items()) + [(f"kv{i}", t.float().cpu().numpy()) for i, t in enumerate(cache)]:
        if np.asarray(v).dtype.kind == "f":
            assert np.isfinite(v).all(), k
