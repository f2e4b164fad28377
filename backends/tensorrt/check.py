"""Static TensorRT compatibility check of a lowered step graph: no TensorRT, no GPU needed.

`check_onnx(model)` walks every node (subgraphs included) against the ONNX-TensorRT support matrix in `support.py`
and returns `Finding`s:

- error: an op the parser does not support (or does not list: it would need a plugin), a data type outside the op's
  supported types, an attribute value outside its allowed values, an input that must be an initializer (or resolve
  to a constant) but is computed at run time, a TopK whose K exceeds TensorRT's limit, an opset outside the parser's
  range;
- warning: things that build but behave differently from onnxruntime: a random op whose seed TensorRT ignores, a
  DOUBLE tensor cast down to FLOAT, a TopK K only known at run time, an op without FP16/BF16 kernels at that precision,
  an fp32 step graph checked at fp16/bf16 (strongly typed: it builds fp32), an fp32 mask cast to FP16 without a floor
  in the fp16 range (-inf, then NaN rows).

Constant inputs are resolved the way the parser sees them: "initializer" means an initializer or a `Constant` node
output (optionally through `Identity`); "constant" also folds constant-only subgraphs (and `Shape` of a static tensor).
Dtypes and shapes come from ONNX shape inference on a weight-free copy of the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .support import OPSET_RANGE, TOPK_MAX_K, TRT_MATRIX_VERSION, lookup

__all__ = ["Finding", "check_onnx", "check_artifact", "format_report", "op_inventory", "format_op_table",
           "PRECISIONS"]

PRECISIONS = ("fp32", "fp16", "bf16")

_DT = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.INT4: "INT4",
}
for _n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"):
    if hasattr(TensorProto, _n):
        _DT[getattr(TensorProto, _n)] = "FP8"
if hasattr(TensorProto, "FLOAT4E2M1"):
    _DT[TensorProto.FLOAT4E2M1] = "FP4"


def _dtname(elem_type: int) -> str:
    return _DT.get(elem_type) or TensorProto.DataType.Name(elem_type)


@dataclass(frozen=True)
class Finding:
    """One problem: `node` is the ONNX node name (e.g. `sampler/top_k/TopK`), or `input:<name>` for a graph input."""
    node: str
    op_type: str
    severity: str          # "error" | "warning"
    reason: str
    rule: str = ""         # unsupported-op | not-in-matrix | dtype | attribute | initializer | constant |
    #                        topk-k | seed-ignored | double | precision | opset | static-shape | unsupported-io

    def __str__(self) -> str:
        return f"{self.severity}: {self.node} ({self.op_type}): {self.reason}"


# -- graph facts --------------------------------------------------------------------------------------------------
def _nbytes(t: TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * 8


def _light_copy(model: onnx.ModelProto, limit: int = 1 << 16) -> onnx.ModelProto:
    """The graph without its big weights (they only matter to shape inference through dims and dtype)."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    g = m.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    known = {o.domain for o in model.opset_import}
    for d in sorted({nd.domain for nd in model.graph.node} - known - {"ai.onnx"}):
        m.opset_import.append(onnx.helper.make_opsetid(d, 1))     # custom ops: inference skips them, not the graph
    for t in model.graph.initializer:
        external = t.data_location == TensorProto.EXTERNAL
        if not external and _nbytes(t) <= limit:
            g.initializer.append(t)
        else:
            stub = TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
            g.initializer.append(stub)
    return m


def _type_info(vi) -> tuple[str | None, tuple | None]:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return None, None
    et = _dtname(tt.elem_type) if tt.elem_type else None
    if not tt.HasField("shape"):
        return et, None
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return et, dims


class _Graph:
    """Dtypes, shapes, producers, consumers and constant values of one model (subgraphs flattened in)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        light = _light_copy(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 - best effort: retry without the nodes of custom domains
            keep = [nd for nd in light.graph.node if nd.domain in ("", "ai.onnx")]
            del light.graph.node[:]
            light.graph.node.extend(keep)
            try:
                inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False,
                                                             data_prop=True)
            except Exception:  # noqa: BLE001 - dtype checks then use only what the graph declares
                inferred = model
        self.types: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.inits: dict[str, TensorProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.used: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        for g in (inferred.graph, model.graph):
            for vi in list(g.value_info) + list(g.input) + list(g.output):
                et, dims = _type_info(vi)
                if et and vi.name not in self.types:
                    self.types[vi.name] = et
                if dims is not None and vi.name not in self.shapes:
                    self.shapes[vi.name] = dims
        self._walk(model.graph)
        self.used |= {o.name for o in model.graph.output}
        self._memo: dict[str, np.ndarray | None] = {}

    def _walk(self, g: onnx.GraphProto) -> None:
        for t in g.initializer:
            self.inits[t.name] = t
            self.types.setdefault(t.name, _dtname(t.data_type))
            self.shapes.setdefault(t.name, tuple(t.dims))
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            et, dims = _type_info(vi)
            if et:
                self.types.setdefault(vi.name, et)
            if dims is not None:
                self.shapes.setdefault(vi.name, dims)
        for nd in g.node:
            self.nodes.append(nd)
            self.used.update(x for x in nd.input if x)
            for o in nd.output:
                if o:
                    self.producer[o] = nd
            if nd.op_type == "Constant" and nd.output:
                for a in nd.attribute:
                    if a.name == "value":
                        self.types.setdefault(nd.output[0], _dtname(a.t.data_type))
                        self.shapes.setdefault(nd.output[0], tuple(a.t.dims))
            for a in nd.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    self._walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        self._walk(sg)

    # -- constants
    def is_weights(self, name: str) -> bool:
        """What the parser's `is_weights()` accepts: an initializer, a Constant node, or Identity of one."""
        if name in self.inits:
            return True
        p = self.producer.get(name)
        if p is None:
            return False
        if p.op_type == "Constant":
            return True
        return p.op_type == "Identity" and self.is_weights(p.input[0])

    def value(self, name: str, fold: bool = True, depth: int = 0) -> np.ndarray | None:
        """The value of `name` when it is known at build time (None otherwise)."""
        if name in self._memo:
            return self._memo[name]
        v = self._value(name, fold, depth)
        if fold or v is not None:
            self._memo[name] = v
        return v

    def _value(self, name: str, fold: bool, depth: int) -> np.ndarray | None:
        if name in self.inits:
            t = self.inits[name]
            if t.data_location == TensorProto.EXTERNAL or (_nbytes(t) and not _has_data(t)):
                return None
            try:
                return numpy_helper.to_array(t)
            except Exception:  # noqa: BLE001
                return None
        p = self.producer.get(name)
        if p is None or depth > 64:
            return None
        if p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_int", "value_float"):
                    return np.asarray(a.i if a.name == "value_int" else a.f)
                if a.name in ("value_ints", "value_floats"):
                    return np.asarray(list(a.ints) if a.name == "value_ints" else list(a.floats))
            return None
        if p.op_type == "Identity":
            return self.value(p.input[0], fold, depth + 1)
        if not fold:
            return None
        if p.op_type == "Shape":
            dims = self.shapes.get(p.input[0])
            if dims is None or not all(isinstance(d, int) and d > 0 for d in dims):
                return None
            s = np.asarray(dims, np.int64)
            attrs = {a.name: a.i for a in p.attribute}
            return s[attrs.get("start", 0):attrs.get("end", len(s)) if "end" in attrs else None]
        if p.op_type.startswith("Random") or p.op_type in ("Multinomial", "Bernoulli") \
                or p.domain not in ("", "ai.onnx"):
            return None
        ins = []
        for x in p.input:
            if not x:
                ins.append(None)
                continue
            v = self.value(x, fold, depth + 1)
            if v is None:
                return None
            ins.append(v)
        try:
            from onnx.reference import ReferenceEvaluator
            opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 18)
            outs = ReferenceEvaluator(p, opsets={"": opset}).run(None, {x: v for x, v in zip(p.input, ins) if x})
        except Exception:  # noqa: BLE001 - anything the reference evaluator cannot do is simply not folded
            return None
        for o, v in zip(p.output, outs):
            if o and o != name:
                self._memo[o] = np.asarray(v)
        idx = list(p.output).index(name)
        return np.asarray(outs[idx])

    def origin(self, name: str) -> str:
        p = self.producer.get(name)
        if p is None:
            return "a graph input" if name not in self.inits else "an initializer"
        return f"node '{p.name or p.op_type}' ({p.op_type})"


def _has_data(t: TensorProto) -> bool:
    return bool(t.raw_data) or any(len(getattr(t, f)) for f in
                                   ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                                    "string_data"))


def _attr(nd: onnx.NodeProto, name: str, default=None):
    for a in nd.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _norm(v):
    return v.decode() if isinstance(v, bytes) else v


def _meta(nd: onnx.NodeProto, key: str) -> str | None:
    return next((p.value for p in nd.metadata_props if p.key == key), None)


# -- the check ----------------------------------------------------------------------------------------------------
def check_onnx(model: onnx.ModelProto, precision: str = "fp16") -> list[Finding]:
    """Check a step graph against TensorRT's ONNX parser (support matrix of TensorRT 10.15) at `precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    G = _Graph(model)
    out: list[Finding] = []
    seen: set = set()

    def add(nd_name: str, op: str, sev: str, reason: str, rule: str) -> None:
        key = (nd_name, rule, reason)
        if key not in seen:
            seen.add(key)
            out.append(Finding(nd_name, op, sev, reason, rule))

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        add("(model)", "opset", "error", f"default-domain opset {opset} is outside the range TensorRT "
            f"{TRT_MATRIX_VERSION}'s parser imports ({OPSET_RANGE[0]}..{OPSET_RANGE[1]})", "opset")

    for gi in model.graph.input:
        et, dims = _type_info(gi)
        if et not in (None, "FP32", "FP16", "BF16", "INT32", "INT64", "BOOL", "UINT8", "INT8", "FP8", "DOUBLE"):
            add(f"input:{gi.name}", "graph input", "error", f"graph input of type {et} is not a TensorRT I/O type",
                "unsupported-io")
    _check_mask_precision(G, precision, add)

    for nd in G.nodes:
        name = nd.name or f"<{nd.op_type} -> {nd.output[0] if nd.output else '?'}>"
        op = nd.op_type
        if nd.domain not in ("", "ai.onnx"):
            add(name, op, "error", f"custom-domain op '{nd.domain}::{op}' is not in the ONNX-TensorRT matrix; it "
                "needs a TensorRT plugin of that name", "not-in-matrix")
            continue
        row = lookup(op)
        if row is None:
            add(name, op, "error", f"{op} is not in the ONNX-TensorRT support matrix (TensorRT "
                f"{TRT_MATRIX_VERSION}); the parser would look for a plugin named '{op}'", "not-in-matrix")
            continue
        if not row.supported:
            add(name, op, "error", f"{op} is not supported by TensorRT's ONNX parser"
                + (f" ({row.restrictions})" if row.restrictions else ""), "unsupported-op")
            continue
        _check_types(G, nd, name, row, precision, add)
        _check_attrs(nd, name, row, add)
        for i in row.no_inputs:
            if len(nd.input) > i and nd.input[i]:
                add(name, op, "error", f"input {i} ('{nd.input[i]}') is not supported by TensorRT ({row.restrictions})",
                    "attribute")
        for i in row.no_outputs:
            if len(nd.output) > i and nd.output[i] and nd.output[i] in G.used:
                add(name, op, "error", f"output {i} ('{nd.output[i]}') is used, but TensorRT does not produce it "
                    f"({row.restrictions})", "attribute")
        for i, what in row.initializer.items():
            if len(nd.input) > i and nd.input[i] and not G.is_weights(nd.input[i]):
                add(name, op, "error", f"{what} (input {i}, '{nd.input[i]}') must be an initializer, but is computed "
                    f"at run time by {G.origin(nd.input[i])}", "initializer")
        for i, what in row.constant.items():
            if len(nd.input) > i and nd.input[i] and G.value(nd.input[i]) is None and not G.is_weights(nd.input[i]):
                add(name, op, "error", f"{what} (input {i}, '{nd.input[i]}') must resolve to a constant, but is "
                    f"computed at run time by {G.origin(nd.input[i])}", "constant")
        for i in row.static_dims:
            dims = G.shapes.get(nd.input[i]) if len(nd.input) > i else None
            if dims is None or not all(isinstance(d, int) for d in dims):
                add(name, op, "error", f"input {i} must have static dimensions for TensorRT (has "
                    f"{list(dims) if dims is not None else 'unknown'})", "static-shape")
        if op == "Hardmax":
            dims = G.shapes.get(nd.input[0])
            ax = _attr(nd, "axis", -1)
            if dims is None or not isinstance(dims[ax], int):
                add(name, op, "error", "the `axis` dimension of the input must be a build-time constant",
                    "static-shape")
        if row.seed_ignored:
            seed = _attr(nd, "seed")
            add(name, op, "warning", f"TensorRT ignores `seed`{'' if seed is None else f' ({seed:g})'}: "
                "in-graph noise is not reproducible on TensorRT (a seeded run differs from onnxruntime and from run to "
                "run); use sampling.noise: precomputed for seeded sampling", "seed-ignored")
        if op == "TopK":
            _check_topk(G, nd, name, add)
    return out


FP16_MIN = float(np.finfo(np.float16).min)


def _check_mask_precision(G: _Graph, precision: str, add) -> None:
    """TensorRT builds strongly typed: an fp32 step graph gives an fp32 engine whatever precision is asked. In an
    fp16 graph, every Cast to FP16 that an fp32 additive mask reaches must follow a Max with a finite floor >= the fp16
    minimum: the host's float32-min mask casts to -inf otherwise, and a fully masked (left-padding) row's softmax is
    then NaN, which reaches real rows through the KV cache."""
    masks = [gi.name for gi in G.model.graph.input if gi.name.endswith("mask") and _type_info(gi)[0] == "FP32"]
    half = any(_type_info(gi)[0] == "FP16" for gi in G.model.graph.input)
    if precision in ("fp16", "bf16") and not half:
        fix = "compile with target.precision fp16" if precision == "fp16" else \
            "dgopt does not export bf16 graphs yet (use fp16)"
        add("(model)", "graph", "warning", f"the step graph is fp32: TensorRT builds strongly typed (precision comes "
            f"from the ONNX types), so this engine would run in fp32, not {precision}; {fix}", "precision")
        return
    consumers: dict[str, list] = {}
    for nd in G.nodes:
        for x in nd.input:
            consumers.setdefault(x, []).append(nd)
    seen, todo = set(masks), list(masks)
    while todo:
        v = todo.pop()
        for nd in consumers.get(v, []):
            if nd.op_type == "Cast" and _attr(nd, "to") == TensorProto.FLOAT16:
                p = G.producer.get(nd.input[0])
                floor = None
                if p is not None and p.op_type == "Max":
                    vals = [G.value(x) for x in p.input if x != v]
                    floor = min((float(np.min(c)) for c in vals if c is not None), default=None)
                if floor is None or not np.isfinite(floor) or floor < FP16_MIN:
                    add(nd.name or f"<Cast -> {nd.output[0]}>", "Cast", "warning", "an fp32 additive mask is cast "
                        "to FP16 without a floor in the fp16 range (Max with >= -65504 first): its float32 minimum "
                        "becomes -inf and fully masked rows give NaN", "precision")
                continue
            for o in nd.output:
                if o and o not in seen:
                    seen.add(o)
                    todo.append(o)


def _check_types(G: _Graph, nd, name, row, precision, add) -> None:
    op = nd.op_type
    idx = range(len(nd.input)) if row.typed_inputs == "all" else row.typed_inputs
    checks = [(f"input {i} ('{nd.input[i]}')", G.types.get(nd.input[i]))
              for i in idx if i < len(nd.input) and nd.input[i]]
    if row.typed_outputs:
        if op == "Cast":
            checks.append(("the cast target `to`", _dtname(_attr(nd, "to", 0))))
        else:
            checks += [(f"output {i} ('{o}')", G.types.get(o)) for i, o in enumerate(nd.output) if o]
    floats = False
    for what, dt in checks:
        if dt is None:
            continue
        if dt == "DOUBLE":
            add(name, op, "warning", f"{what} is DOUBLE: TensorRT casts it down to FLOAT (clamped to +-FLT_MAX)",
                "double")
            dt = "FP32"
        if dt not in row.types:
            add(name, op, "error", f"{what} is {dt}; TensorRT's {op} supports {', '.join(sorted(row.types))}",
                "dtype")
        floats |= dt in ("FP32", "FP16", "BF16")
    want = {"fp16": "FP16", "bf16": "BF16"}.get(precision)
    if want and floats and want not in row.types:
        add(name, op, "warning", f"TensorRT has no {want} {op}; this layer stays in "
            f"{'FP32' if 'FP32' in row.types else 'its input type'} at precision {precision}", "precision")


def _check_attrs(nd, name, row, add) -> None:
    for attr, (default, allowed) in row.attrs.items():
        v = _norm(_attr(nd, attr, default))
        if v not in allowed:
            add(name, nd.op_type, "error", f"attribute {attr}={v!r} is not supported by TensorRT (allowed: "
                f"{', '.join(map(repr, allowed))})", "attribute")


def _check_topk(G: _Graph, nd, name, add) -> None:
    if len(nd.input) < 2 or not nd.input[1]:
        k = _attr(nd, "k")              # opset < 10
        src = "attribute k"
    else:
        kv = G.value(nd.input[1])
        k = None if kv is None or kv.size != 1 else int(np.asarray(kv).reshape(-1)[0])
        src = f"input 1 ('{nd.input[1]}')"
    hint = ""
    if _meta(nd, "dgopt.ir_op") == "top_p":
        hint = " (top-p lowers to a full-vocabulary sort, TopK with K = V: vocabularies above " \
               f"{TOPK_MAX_K} need another top-p lowering)"
    if k is None:
        add(name, "TopK", "warning", f"K ({src}) is computed at run time, by {G.origin(nd.input[1])}: TensorRT "
            f">= 8.6 accepts a run-time K, but K <= {TOPK_MAX_K} is then only checked when the engine runs "
            "(TensorRT < 8.6 requires an initializer)", "topk-k")
        return
    if k > TOPK_MAX_K:
        add(name, "TopK", "error", f"K = {k} exceeds TensorRT's TopK limit of {TOPK_MAX_K}{hint}", "topk-k")
    dims = G.shapes.get(nd.input[0])
    if dims:
        ax = _attr(nd, "axis", -1)
        d = dims[ax] if -len(dims) <= ax < len(dims) else None
        if isinstance(d, int) and d > 0 and k > d:
            add(name, "TopK", "error", f"K = {k} is larger than the sorted dimension ({d})", "topk-k")


# -- entry points -------------------------------------------------------------------------------------------------
def check_artifact(path: str | Path, precision: str | None = None) -> list[Finding]:
    """Check an artifact directory's step graph (or a `.onnx` file). `precision` defaults to the artifact's
    `target.precision` (fp16 for a bare .onnx file). Weights are not loaded."""
    path = Path(path)
    if path.is_dir():
        from dgopt.artifact import read_manifest
        manifest = read_manifest(path)
        step = path / manifest["step"]
        precision = precision or manifest["target"].get("precision", "fp32")
    else:
        from dgopt.errors import ArtifactError
        if not path.is_file():
            raise ArtifactError(f"not found: {path}")
        step = path
        precision = precision or "fp16"
    try:
        model = onnx.load(str(step), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own types
        from dgopt.errors import ArtifactError
        raise ArtifactError(f"cannot read {step.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return check_onnx(model, precision)


def format_report(findings: list[Finding], title: str | None = None) -> str:
    """One line per finding (errors first, then warnings, each in graph order) and a summary line."""
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity != "error"]
    lines = [f"{f.severity:<7} {f.node} ({f.op_type}): {f.reason}" for f in errors + warnings]

    def n(k, w):
        return f"{k} {w}{'' if k == 1 else 's'}"
    head = title or f"TensorRT {TRT_MATRIX_VERSION} check"
    verdict = "not buildable" if errors else "ok"
    lines.append(f"{head}: {n(len(errors), 'error')}, {n(len(warnings), 'warning')} ({verdict})")
    return "\n".join(lines)


def op_inventory(model: onnx.ModelProto) -> dict[str, int]:
    """op_type -> number of nodes (subgraphs included), sorted by op name."""
    counts: dict[str, int] = {}
    for nd in _Graph(model).nodes:
        key = nd.op_type if nd.domain in ("", "ai.onnx") else f"{nd.domain}::{nd.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def format_op_table(model: onnx.ModelProto) -> str:
    """The ops of a graph with their TensorRT status and restrictions (for `dgopt check --verbose`)."""
    rows = []
    for op, k in op_inventory(model).items():
        row = lookup(op)
        status = "not in matrix" if row is None else ("supported" if row.supported else "NOT supported")
        extra = f" - {row.restrictions}" if row is not None and row.restrictions else ""
        rows.append(f"{op:<22} x{k:<5} {status}{extra}")
    return "\n".join(rows)
