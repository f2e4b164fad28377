"""TensorRT backend: the static support check (runs everywhere), the build flow against a stand-in `tensorrt` module,
engine-compatibility checks, and real engine build + run tests that skip unless TensorRT and a CUDA GPU are present."""
import enum
import sys
import types

import numpy as np
import onnx
import pytest
from conftest import PROMPTS, TINY
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
    fp16 = check_artifact(art, "fp16")
    assert [(f.node, f.rule, f.severity) for f in fp16] == [("input:attn_mask", "precision", "warning")]
    table = format_op_table(step(art))
    assert "TopK" in table and "supported" in table


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
    assert shapes["input_ids"] == ((1, 1), (4, 1), (4, 64))
    assert shapes["attn_mask"] == ((1, 1, 1, 1), (4, 1, 1, 33), (4, 1, 64, 64))
    assert shapes["past.0.key"] == ((1, 2, 0, 16), (4, 2, 32, 16), (4, 2, 63, 16))
    assert shapes["gumbel"] == ((1, 320), (4, 320), (4, 320))
    with pytest.raises(BackendError):
        profile_shapes(art / "step.onnx", max_batch=4, max_seq_len=64, opt_past=64)


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


def _fake_tensorrt(fail_parse=False):
    """A stand-in for the few TensorRT 10 Python API objects build_engine touches (recording what it is asked)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.1.29"
    trt.float32, trt.float16, trt.bfloat16, trt.int64, trt.int32, trt.bool = "f32", "f16", "bf16", "i64", "i32", "b"
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 BF16 PREFER_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    rec = trt.rec = {"flags": set(), "profile": {}, "pinned": []}

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self):
            pass

    class T:
        def __init__(self, name, dtype="f32"):
            self.name, self.dtype = name, dtype

    class Layer:
        def __init__(self, name, dtype):
            self.name, self._out, self.precision = name, [T(name + ":0", dtype)], None
            self.num_outputs = 1

        def get_output(self, j):
            return self._out[j]

        def set_output_type(self, j, dt):
            rec["pinned"].append(self.name)

    class Network:
        def __init__(self):
            self.inputs, self.layers = [], []
            self.num_inputs = self.num_layers = 0

        def get_input(self, i):
            return self.inputs[i]

        def get_layer(self, i):
            return self.layers[i]

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
            g = onnx.load(path, load_external_data=False).graph
            self.net.inputs = [T(i.name) for i in g.input]
            self.net.layers = [Layer(n.name, "f32" if n.op_type != "ArgMax" else "i64") for n in g.node]
            self.net.num_inputs, self.net.num_layers = len(self.net.inputs), len(self.net.layers)
            return True

        def get_error(self, i):
            return Error()

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            rec["profile"][name] = (tuple(mn), tuple(opt), tuple(mx))

    class Cache:
        def serialize(self):
            return b"CACHE"

    class Config:
        def set_flag(self, f):
            rec["flags"].add(f.name)

        def set_memory_pool_limit(self, pool, n):
            rec["workspace"] = n

        def add_optimization_profile(self, p):
            rec["profiles"] = rec.get("profiles", 0) + 1

        def create_timing_cache(self, data):
            rec["cache_in"] = bytes(data)
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def get_timing_cache(self):
            return Cache()

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"PLAN"

    trt.ILogger, trt.OnnxParser, trt.Builder = ILogger, OnnxParser, Builder
    return trt


def _fake_gpu(monkeypatch, trt):
    import torch
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")


def test_build_flow_against_a_stand_in_tensorrt(artifacts, tmp_path, monkeypatch):
    art = artifacts("llama", 0, sampling=SAMPLING["sample"])
    trt = _fake_tensorrt()
    _fake_gpu(monkeypatch, trt)
    plan, meta = build_engine(art, tmp_path / "engine.plan", precision="fp16", max_batch=2, max_seq_len=32,
                              workspace_gb=1)
    assert plan.read_bytes() == b"PLAN" and (tmp_path / "timing.cache").read_bytes() == b"CACHE"
    assert trt.rec["flags"] == {"FP16", "PREFER_PRECISION_CONSTRAINTS"} and trt.rec["profiles"] == 1
    assert set(trt.rec["profile"]) == {i.name for i in step(art).graph.input}
    assert trt.rec["profile"]["past.1.value"] == ((1, 2, 0, 16), (2, 2, 16, 16), (2, 2, 31, 16))
    pinned = set(trt.rec["pinned"])
    assert "sampler/top_p/CumSum" in pinned and "sampler/multinomial/CumSum" in pinned
    assert not any(p.startswith("target/") for p in pinned)
    assert meta["version"] == "10.15.1.29" and meta["compute_capability"] == [8, 9]
    assert meta["precision"] == "fp16" and meta["profile"]["input_ids"]["max"] == [2, 32]
    # the built-in static check runs first: a graph TensorRT cannot take stops before the builder
    big = artifacts("llama", 2, model={"config": dict(TINY["llama"], vocab_size=4096), "seed": 0},
                    sampling={"kind": "sample", "top_p": 0.9})
    with pytest.raises(BackendError, match="not TensorRT-buildable.*sampler/top_p/TopK"):
        build_engine(big, tmp_path / "big.plan", precision="fp16")


def test_build_reports_parser_errors(artifacts, tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, _fake_tensorrt(fail_parse=True))
    with pytest.raises(BackendError, match=r"parser rejected step\.onnx: sampler/top_p/TopK \(TopK\): planted"):
        build_engine(artifacts("llama", 0, sampling=SAMPLING["sample"]), tmp_path / "e.plan", precision="fp32")


def test_build_without_tensorrt_says_so(artifacts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # import tensorrt -> ImportError
    with pytest.raises(BackendError, match="TensorRT not installed"):
        build_engine(artifacts("gpt2", 2, sampling=SAMPLING["greedy"]), tmp_path / "e.plan", check=False)
    assert not is_available()


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
def test_engine_fp16_runs_and_is_compatible(artifacts, tmp_path):
    art = artifacts("llama", 0, sampling=SAMPLING["sample"])
    plan, meta = build_engine(art, tmp_path / "engine.plan", precision="fp16", max_batch=2, max_seq_len=64)
    check_engine_compat({"tensorrt": meta})
    res = _trt_decoder(art, plan, meta).generate(PROMPTS[:2], max_new_tokens=8, seed=1)
    assert all(0 <= t < TINY["llama"]["vocab_size"] for row in res.ids for t in row)
    with pytest.raises(ArtifactError):
        check_engine_compat({"tensorrt": dict(meta, version="0.0.0")})
