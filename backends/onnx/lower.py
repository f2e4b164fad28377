"""Lower an optimised IR step graph to ONE ONNX graph: inlined model forward(s) + logits processors + sampler.

Node names read as `<ir node id>/<OnnxOp>` (e.g. `sampler/top_k/TopK`); every node carries its IR op, IR node and the
pass that made it in doc_string and metadata_props, so Netron shows where it came from."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dgopt.errors import BackendError
from dgopt.ir import Graph
from dgopt.ir.verify import value_type

__all__ = ["lower_to_onnx", "OPSET", "LOWERINGS"]

OPSET = 18
NEG_INF = float("-inf")
F32, I64, F16 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT16
# an fp16 forward gets the additive mask clamped to this before the cast, which would turn the host's fp32 minimum
# into -inf: a finite mask far below any score, as transformers' fp16 masks are finite (finfo.min), so a fully masked
# pad row stays a finite softmax instead of -inf - -inf = NaN
FP16_MASK_MIN = -30000.0


def _kv_et(info: dict) -> int:
    return F16 if info.get("kv_dtype") == "float16" else F32


class _Builder:
    def __init__(self, g: Graph, forwards: dict, vocab_size: int | None):
        self.g = g
        self.forwards = forwards            # model name -> (ModelProto of the forward, info dict)
        self.V = vocab_size
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.names: dict = {}               # ValueRef -> onnx name (kv: list of names)
        self.io: dict = {"inputs": [], "outputs": []}
        self._cur = None
        self._n = 0

    # -- helpers
    def const(self, value, dtype=np.float32, name: str | None = None) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = name or f"const/{self._cur.id}/{len(self.inits)}"
        self.inits[name] = numpy_helper.from_array(arr, name)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str] | str:
        node = self._cur
        self._n += 1
        base = f"{node.id}/{op_type}"
        name = base if not any(n.name == base for n in self.nodes) else f"{base}_{self._n}"
        outs = [f"{name}:{i}" for i in range(n_out)]
        nd = helper.make_node(op_type, inputs, outs, name=name, **attrs)
        self._stamp(nd, node)
        self.nodes.append(nd)
        return outs if n_out > 1 else outs[0]

    @staticmethod
    def _stamp(nd, node) -> None:
        by = node.meta.get("created_by")
        nd.doc_string = f"dgopt IR node '{node.id}' (op {node.op})" + (f", created by pass {by}" if by else "")
        for k, v in (("dgopt.ir_node", node.id), ("dgopt.ir_op", node.op), ("dgopt.pass", by)):
            if v:
                nd.metadata_props.add(key=k, value=str(v))

    def dims(self, vtype: str):
        V = self.V
        return {
            "tokens": (I64, ["batch", "q"]), "positions": (I64, ["batch", "q"]),
            "mask": (F32, ["batch", 1, "q", "total"]), "logits": (F32, ["batch", V]),
            "probs": (F32, ["batch", V]), "gumbel": (F32, ["batch", V]), "seen": (F32, ["batch", V]),
            "uniform": (F32, ["batch"]), "token": (I64, ["batch"]), "logits_seq": (F32, ["batch", "q", V]),
            "candidates": (I64, ["batch", "guesses", "length"]), "count": (I64, ["batch"]),
            "probs_seq": (F32, ["batch", "length", V]), "uniform_seq": (F32, ["batch", "length"]),
            "trip_count": (I64, []), "flag": (TensorProto.BOOL, []),
        }[vtype]

    # -- main
    def build(self) -> onnx.ModelProto:
        for node in self.g.topo_order():
            self._cur = node
            fn = LOWERINGS.get(node.op)
            if fn is None:
                raise BackendError(f"onnx backend: no lowering for IR op '{node.op}' (node '{node.id}')")
            fn(self, node, [self.names[r] for r in node.inputs])
        for oname, ref in self.g.outputs.items():
            vt = value_type(self.g, ref)
            self._cur = self.g.node(ref.node)
            if vt == "kv":
                info = self._kv_info(ref)
                for src, i, kv in zip(self.names[ref], *zip(*[(i, kv) for i in range(info["num_layers"])
                                                              for kv in ("key", "value")])):
                    name = f"{oname}.{i}.{kv}"
                    self._name_output(src, name)
                    self.outputs.append(helper.make_tensor_value_info(
                        name, _kv_et(info), ["batch", info["num_kv_heads"], f"{oname}_len", info["head_dim"]]))
                self.io["outputs"].append({"name": oname, "type": "kv", "tensors": [
                    f"{oname}.{i}.{kv}" for i in range(info["num_layers"]) for kv in ("key", "value")]})
            else:
                self._name_output(self.names[ref], oname)
                et, shape = self.dims(vt)
                shape = [f"{oname}_{d}" if d in ("q", "total") else d for d in shape]
                if oname == "accept_tokens":
                    shape = ["batch", "length_plus_one"]
                self.outputs.append(helper.make_tensor_value_info(oname, et, shape))
                self.io["outputs"].append({"name": oname, "type": vt, "dtype": _dtname(et), "shape": shape})
        graph = helper.make_graph(self.nodes, "dgopt_step", self.inputs, self.outputs, list(self.inits.values()))
        # a forward written with onnxruntime's contrib ops (direct.py, contrib=True) brings their domain along
        domains = sorted(_domains(self.nodes) - {"", "ai.onnx"})
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)] + [
            helper.make_opsetid(d, 1) for d in domains], producer_name="dgopt")
        model.ir_version = 10
        return model

    def _name_output(self, src: str, dst: str) -> None:
        """Give the step output its public name by renaming the value that holds it: an Identity would be a real copy
        at run time (ORT keeps Identity nodes that feed graph outputs), e.g. of the whole KV cache every step.
        Graph inputs, weights and a value that is already another output still get an Identity."""
        producers = [nd for nd in self.nodes if src in nd.output]
        taken = {o.name for o in self.outputs} | {i.name for i in self.inputs}
        if len(producers) != 1 or src in taken or src in self.inits:
            self.nodes.append(self._identity(src, dst))
            return
        for nd in self.nodes:
            for seq in (nd.input, nd.output):
                for i, x in enumerate(seq):
                    if x == src:
                        seq[i] = dst
        for ref, v in self.names.items():   # later outputs may name the same value
            if v == src:
                self.names[ref] = dst
            elif isinstance(v, list) and src in v:
                self.names[ref] = [dst if x == src else x for x in v]

    def _identity(self, src: str, dst: str):
        nd = helper.make_node("Identity", [src], [dst], name=f"output/{dst}")
        self._stamp(nd, self._cur)
        return nd

    def _kv_info(self, ref):
        node = self.g.node(ref.node)
        model = node.attrs.get("model", "target") if node.op in ("forward", "draft_loop") else "target"
        return self.forwards[model][1]


def _domains(nodes) -> set[str]:
    """Op domains of nodes and of their subgraphs (a draft_loop's body)."""
    out = set()
    for nd in nodes:
        out.add(nd.domain)
        for a in nd.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out |= _domains(a.g.node)
    return out


def _dtname(et: int) -> str:
    return {F32: "float32", I64: "int64", TensorProto.BOOL: "bool"}[et]   # bool: a flag (tests lower one alone)


# -- lowering rules, one per IR op ---------------------------------------------------------------------------------
def _input(b: _Builder, node, ins):
    vt, name = node.attrs["type"], node.attrs["name"]
    if vt == "kv":     # the cache of the model whose forward reads it (a fused step has target and draft caches)
        models = [u.attrs["model"] for u in b.g.users(node.out()) if u.op in ("forward", "draft_loop")]
        info = b.forwards[models[0] if models else "target"][1]
        names = [f"{name}.{i}.{kv}" for i in range(info["num_layers"]) for kv in ("key", "value")]
        for n in names:
            b.inputs.append(helper.make_tensor_value_info(
                n, _kv_et(info), ["batch", info["num_kv_heads"], "past" if name == "past" else f"{name}_len",
                                  info["head_dim"]]))
        b.names[node.out()] = names
        b.io["inputs"].append({"name": name, "type": "kv", "tensors": names})
        return
    et, shape = b.dims(vt)
    # symbolic dims are equalities to onnxruntime: every branch gets its own q / total
    branch = "" if name in ("input_ids", "position_ids", "attn_mask") else name.split("_")[0] + "_"
    shape = [f"{branch}{d}" if d in ("q", "total") else d for d in shape]
    b.inputs.append(helper.make_tensor_value_info(name, et, shape))
    b.names[node.out()] = name
    b.io["inputs"].append({"name": name, "type": vt, "dtype": _dtname(et), "shape": shape})


def _forward(b: _Builder, node, ins):
    """Inline the exported forward: its values are prefixed by the IR node id, its weights by the model name, so two
    forward nodes of one model share weights."""
    try:
        proto, info = b.forwards[node.attrs["model"]]
    except KeyError:
        raise BackendError(f"onnx backend: node '{node.id}' calls model '{node.attrs['model']}', which the spec "
                           f"does not define") from None
    fg = proto.graph
    model = node.attrs["model"]
    ids, pos, mask, past = ins
    half = _kv_et(info) == F16
    if half:    # the step's mask stays fp32 (one host format); the fp16 forward gets a clamped half copy
        mask = b.op("Cast", [b.op("Max", [mask, b.const(FP16_MASK_MIN)])], to=F16)
    rename = {"input_ids": ids, "position_ids": pos, "attn_mask": mask}
    rename |= dict(zip([i.name for i in fg.input[3:]], past))
    for init in fg.initializer:
        new = f"{model}/{init.name}"
        rename[init.name] = new
        if new not in b.inits:
            t = onnx.TensorProto()
            t.CopyFrom(init)
            t.name = new
            b.inits[new] = t

    def nm(x: str) -> str:
        if x == "":
            return x
        if x not in rename:
            rename[x] = f"{node.id}/{x.lstrip('/')}"
        return rename[x]

    for src in fg.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in src.attribute):
            raise BackendError(f"onnx backend: exported forward of '{model}' has control flow ({src.op_type}); "
                               "not supported")
        nd = onnx.NodeProto()
        nd.CopyFrom(src)
        del nd.input[:]
        del nd.output[:]
        nd.input.extend(nm(x) for x in src.input)
        nd.output.extend(nm(x) for x in src.output)
        nd.name = f"{node.id}/{(src.name or src.op_type).lstrip('/')}"
        b._stamp(nd, node)
        b.nodes.append(nd)
    outs = [nm(o.name) for o in fg.output]
    # processors and samplers run on fp32 scores, as transformers' generate upcasts the next-token logits
    b.names[node.out("logits")] = b.op("Cast", [outs[0]], to=F32) if half else outs[0]
    b.names[node.out("kv")] = outs[1:]
    if _used(b, node, "hidden"):
        from .lower_recycle import forward_hidden
        b.names[node.out("hidden")] = forward_hidden(b, fg, outs[0], nm, half)


def _last_position(b, node, ins):
    b.names[node.out()] = b.op("Gather", [ins[0], b.const(-1, np.int64)], axis=1)


def _neg_fill(b, remove: str, x: str) -> str:
    # min(x, +inf where kept, -inf where removed): exact, and ~3x cheaper than Where on ORT's CPU EP
    keep = b.op("Cast", [b.op("Not", [remove])], to=F32)
    return b.op("Min", [x, b.op("Mul", [b.op("Sub", [keep, b.const(0.5)]), b.const(np.inf)])])


def _penalized(b, x: str, p: float) -> str:
    """HF's rule (x > 0: x / p, else x * p) as min(x/p, x*p) for p > 1 (max for p < 1): the same two roundings,
    without Where, which on ORT's CPU EP costs ~15x a Mul (183 vs 12 ms over 19.5M floats)."""
    return b.op("Min" if p > 1 else "Max", [b.op("Div", [x, b.const(p)]), b.op("Mul", [x, b.const(p)])])


def _penalized_where_seen(b, x: str, seen: str, p: float) -> str:
    """seen > 0 ? penalized(x) : x, exactly: for p > 1 penalized(x) <= x, so min(x, max(penalized(x), c)) with
    c = +inf where unseen and -inf where seen (for p < 1 the mirror image); c = (unseen - 0.5) * inf is never 0*inf."""
    unseen = b.op("Cast", [b.op("LessOrEqual", [seen, b.const(0.0)])], to=F32)
    c = b.op("Mul", [b.op("Sub", [unseen, b.const(0.5)]), b.const(np.inf if p > 1 else -np.inf)])
    inner, outer = ("Max", "Min") if p > 1 else ("Min", "Max")
    return b.op(outer, [x, b.op(inner, [_penalized(b, x, p), c])])


def _repetition_penalty(b, node, ins):
    x, seen = ins
    b.names[node.out()] = _penalized_where_seen(b, x, seen, node.attrs["penalty"])


def _temperature(b, node, ins):
    b.names[node.out()] = b.op("Div", [ins[0], b.const(node.attrs["value"])])


def _top_k(b, node, ins):
    k = min(node.attrs["k"], b.V)
    values, _ = b.op("TopK", [ins[0], b.const([k], np.int64)], n_out=2, axis=-1, largest=1, sorted=1)
    kth = b.op("Slice", [values, b.const([k - 1], np.int64), b.const([k], np.int64), b.const([-1], np.int64)])
    b.names[node.out()] = _neg_fill(b, b.op("Less", [ins[0], kth]), ins[0])


def _top_p(b, node, ins):
    # HF TopPLogitsWarper: ascending sort, cumulative softmax, drop cum <= 1-p, always keep the largest.
    V = b.V
    sv, si = b.op("TopK", [ins[0], b.const([V], np.int64)], n_out=2, axis=-1, largest=0, sorted=1)
    cum = b.op("CumSum", [b.op("Softmax", [sv], axis=-1), b.const(-1, np.int64)])
    drop = b.op("LessOrEqual", [cum, b.const(1.0 - node.attrs["p"])])
    keep_last = np.ones((1, V), bool)
    keep_last[0, -1] = False
    drop = b.op("Cast", [b.op("And", [drop, b.const(keep_last, bool)])], to=F32)
    drop = b.op("ScatterElements", [drop, si, drop], axis=-1)   # si is a permutation: every slot is written
    b.names[node.out()] = _neg_fill(b, b.op("Cast", [drop], to=TensorProto.BOOL), ins[0])


def _min_p(b, node, ins):
    probs = b.op("Softmax", [ins[0]], axis=-1)
    top = b.op("ReduceMax", [probs, b.const([-1], np.int64)], keepdims=1)
    thr = b.op("Mul", [top, b.const(node.attrs["p"])])
    b.names[node.out()] = _neg_fill(b, b.op("Less", [probs, thr]), ins[0])


def _softmax(b, node, ins):
    b.names[node.out()] = b.op("Softmax", [ins[0]], axis=-1)


def _argmax(b, node, ins):
    b.names[node.out()] = b.op("ArgMax", [ins[0]], axis=-1, keepdims=0, select_last_index=0)


def _multinomial(b, node, ins):
    # Inverse CDF with CumSum + compare (TensorRT has no Multinomial): index = #{i : cdf_i <= u * total}.
    probs, u = ins
    cdf = b.op("CumSum", [probs, b.const(-1, np.int64)])
    total = b.op("Slice", [cdf, b.const([-1], np.int64), b.const([b.V], np.int64), b.const([-1], np.int64)])
    thr = b.op("Mul", [b.op("Unsqueeze", [u, b.const([-1], np.int64)]), total])
    below = b.op("Cast", [b.op("LessOrEqual", [cdf, thr])], to=I64)
    idx = b.op("ReduceSum", [below, b.const([-1], np.int64)], keepdims=0)
    b.names[node.out()] = b.op("Min", [idx, b.const(b.V - 1, np.int64)])


def _sample_top_k(b, node, ins):
    # [B, k] work instead of [B, V]: the k values' softmax and inverse CDF, one scatter for q (verification's input)
    x, u = ins
    k = min(node.attrs["k"], b.V)
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    vals, idx = b.op("TopK", [x, i64([k])], n_out=2, axis=-1, largest=1, sorted=1)
    sm = b.op("Softmax", [b.op("Div", [vals, b.const(node.attrs["temperature"])])], axis=-1)
    cdf = b.op("CumSum", [sm, i64(-1)])
    thr = b.op("Mul", [b.op("Unsqueeze", [u, i64([-1])]), b.op("Slice", [cdf, i64([-1]), i64([k]), i64([-1])])])
    j = b.op("Min", [b.op("ReduceSum", [b.op("Cast", [b.op("LessOrEqual", [cdf, thr])], to=I64), i64([-1])],
                          keepdims=1), i64(k - 1)])
    b.names[node.out("token")] = b.op("Squeeze", [b.op("GatherElements", [idx, j], axis=1), i64([1])])
    zeros = b.op("Expand", [b.const(np.zeros((1, b.V), np.float32)), b.op("Shape", [x])])  # x may hold -inf: no x*0
    b.names[node.out("probs")] = b.op("ScatterElements", [zeros, idx, sm], axis=-1)


def _random_uniform(b, node, ins):
    like = b.op("ReduceMax", [ins[0], b.const([-1], np.int64)], keepdims=0)      # a [B] template
    b.names[node.out()] = b.op("RandomUniformLike", [like], dtype=F32, low=0.0, high=1.0,
                               seed=float(node.attrs["seed"]))


def _gumbel_argmax(b, node, ins):
    b.names[node.out()] = b.op("ArgMax", [b.op("Add", ins)], axis=-1, keepdims=0, select_last_index=0)


def _random_gumbel(b, node, ins):
    u = b.op("RandomUniformLike", [ins[0]], dtype=F32, low=0.0, high=1.0, seed=float(node.attrs["seed"]))
    b.names[node.out()] = b.op("Neg", [b.op("Log", [b.op("Neg", [b.op("Log", [u])])])])


INT_MAX = np.iinfo(np.int64).max
MASK_MIN = float(np.finfo(np.float32).min)
FLT_MAX = float(np.finfo(np.float32).max)


def _dim(b, x: str, axis: int) -> str:
    """Shape(x)[axis] as a 1-element int64 tensor."""
    return b.op("Shape", [x], start=axis, end=axis + 1)


def _concat_seq(b, node, ins):
    b.names[node.out()] = b.op("Concat", ins, axis=1)


def _merge_masks(b, node, ins):
    ma, mb = ins
    qa, qb = _dim(b, ma, 2), _dim(b, mb, 2)
    past = b.op("Sub", [_dim(b, ma, 3), qa])
    ax3, zero, end = b.const([3], np.int64), b.const([0], np.int64), b.const([INT_MAX], np.int64)
    a_past, a_blk = b.op("Slice", [ma, zero, past, ax3]), b.op("Slice", [ma, past, end, ax3])
    b_past, b_blk = b.op("Slice", [mb, zero, past, ax3]), b.op("Slice", [mb, past, end, ax3])
    lead = b.op("Shape", [ma], start=0, end=2)                               # [B, 1]
    fill = b.const(MASK_MIN)
    ab = b.op("Expand", [fill, b.op("Concat", [lead, qa, qb], axis=0)])
    ba = b.op("Expand", [fill, b.op("Concat", [lead, qb, qa], axis=0)])
    row_a = b.op("Concat", [a_past, a_blk, ab], axis=3)
    row_b = b.op("Concat", [b_past, ba, b_blk], axis=3)
    b.names[node.out()] = b.op("Concat", [row_a, row_b], axis=2)


def _next_inputs(b, node, ins):
    tok, pos, mask = ins
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    if _used(b, node, "ids"):
        b.names[node.out("ids")] = b.op("Unsqueeze", [tok, i64([1])])
    if _used(b, node, "positions"):
        b.names[node.out("positions")] = b.op("Add", [b.op("Slice", [pos, i64([-1]), i64([INT_MAX]), i64([1])]),
                                                      i64(1)])
    if _used(b, node, "mask"):       # the last query row, and the new token sees itself: one more 0 column
        row = b.op("Slice", [mask, i64([-1]), i64([INT_MAX]), i64([2])])                # [B, 1, 1, total]
        b.names[node.out("mask")] = b.op("Pad", [row, i64([0, 0, 0, 0, 0, 0, 0, 1]), b.const(0.0)],
                                         mode="constant")


def _repetition_penalty_seq(b, node, ins):
    x, seen, cands = ins
    p, i64 = node.attrs["penalty"], (lambda v: b.const(v, np.int64))  # noqa: E731
    K = _dim(b, cands, 2)
    nc = b.op("Mul", [_dim(b, cands, 1), K])                                       # G*K
    head_end = b.op("Sub", [_dim(b, x, 1), b.op("Add", [nc, i64([1])])])          # rows before the verified tail
    tail = b.op("Slice", [x, head_end, i64([INT_MAX]), i64([1])])                  # [B, 1+G*K, V]
    by_seen = _penalized_where_seen(b, tail, b.op("Unsqueeze", [seen, i64([1])]), p)
    # guess g's row j is also penalised at the guess's tokens 0..j: K scatter slots per row, a slot i > j repeating
    # slot 0 (same index, same value: duplicate writes agree); no [.., V] one-hot
    r = b.op("Range", [i64(0), b.op("Squeeze", [K, i64([0])]), i64(1)])
    upto = b.op("LessOrEqual", [b.op("Unsqueeze", [r, i64([0])]), b.op("Unsqueeze", [r, i64([1])])])   # [K(j), K(i)]
    first = b.op("Slice", [cands, i64([0]), i64([1]), i64([2])])                    # [B, G, 1]
    own = b.op("Where", [upto, b.op("Unsqueeze", [cands, i64([2])]), b.op("Unsqueeze", [first, i64([2])])])
    own = b.op("Reshape", [own, b.op("Concat", [i64([0]), nc, K], axis=0)])        # [B, G*K, K] (K may be 0)
    x_idx = b.op("Slice", [own, i64([0]), i64([1]), i64([1])])                     # the x row: rewrites itself
    vals = b.op("Concat", [b.op("GatherElements", [b.op("Slice", [by_seen, i64([0]), i64([1]), i64([1])]), x_idx],
                                axis=2),
                           _penalized(b, b.op("GatherElements", [b.op("Slice", [tail, i64([1]), i64([INT_MAX]),
                                                                                  i64([1])]), own], axis=2), p)],
                          axis=1)
    idx = b.op("Concat", [x_idx, own], axis=1)                                     # [B, 1+G*K, K]
    out_tail = b.op("ScatterElements", [by_seen, idx, vals], axis=2)
    b.names[node.out()] = b.op("Concat", [b.op("Slice", [x, i64([0]), head_end, i64([1])]), out_tail], axis=1)


def _mark_seen(b, node, ins):
    seen, tok = ins
    idx = b.op("Unsqueeze", [tok, b.const([1], np.int64)])                                 # [B, 1]
    ones = b.op("Add", [b.op("Mul", [b.op("Cast", [idx], to=F32), b.const(0.0)]), b.const(1.0)])
    b.names[node.out()] = b.op("ScatterElements", [seen, idx, ones], axis=1)


def _to_candidates(b, node, ins):
    props = ins[0]
    ids = b.op("Where", [b.op("Less", [props, b.const(b.V, np.int64)]), props, b.const(0, np.int64)])
    b.names[node.out("ids")] = ids
    b.names[node.out("candidates")] = b.op("Unsqueeze", [ids, b.const([1], np.int64)])


def _as_seq(b, node, ins):
    b.names[node.out()] = b.op("Unsqueeze", [ins[0], b.const([1], np.int64)])


def _to_target_vocab(b, node, ins):
    """The draft's scores over the target's vocabulary: cut, or padded with -inf. The draft's vocabulary size is
    static (its forward's info), so only the op that is needed is emitted: none for equal vocabularies."""
    x, V, Vd = ins[0], b.V, b.forwards["draft"][1]["vocab_size"]
    if Vd == V:
        b.names[node.out()] = x
    elif Vd < V:
        b.names[node.out()] = b.op("Pad", [x, b.const([0, 0, 0, V - Vd], np.int64), b.const(NEG_INF)],
                                   mode="constant")
    else:
        b.names[node.out()] = b.op("Slice", [x, b.const([0], np.int64), b.const([V], np.int64),
                                             b.const([1], np.int64)])


def _used(b, node, out: str) -> bool:
    ref = node.out(out)
    return bool(b.g.users(ref)) or b.g.is_output(ref)


def _split_seq(b, node, ins):
    x, first = ins
    q1, ax = _dim(b, first, 1), b.const([1], np.int64)
    if _used(b, node, "head"):
        b.names[node.out("head")] = b.op("Slice", [x, b.const([0], np.int64), q1, ax])
    if _used(b, node, "tail"):
        b.names[node.out("tail")] = b.op("Slice", [x, q1, b.const([INT_MAX], np.int64), ax])


def _split_kv(b, node, ins):
    kv, first, second = ins
    qa, qb = _dim(b, first, 1), _dim(b, second, 1)
    ax, zero, end = b.const([2], np.int64), b.const([0], np.int64), b.const([INT_MAX], np.int64)
    heads, tails = [], []
    for t in kv:
        past = b.op("Sub", [b.op("Sub", [_dim(b, t, 2), qa]), qb])
        cut = b.op("Add", [past, qa])
        if _used(b, node, "head"):
            heads.append(b.op("Slice", [t, zero, cut, ax]))
        if _used(b, node, "tail"):
            tails.append(b.op("Concat", [b.op("Slice", [t, zero, past, ax]), b.op("Slice", [t, cut, end, ax])],
                              axis=2))
    b.names[node.out("head")], b.names[node.out("tail")] = heads, tails


def _verify_greedy(b, node, ins):
    logits, cands = ins
    am = b.op("ArgMax", [logits], axis=-1, keepdims=0)                              # [B, k + G*K]
    if node.attrs["length"] == -1:
        _accept_one_chain(b, node, am, cands)
    else:
        _accept_chain(b, node, am, cands)


def _accept_one_chain(b, node, am, cands):
    """_accept_chain for one candidate whose length K is read off its shape [B, 1, K] (a draft_loop's proposals: K
    varies per step). best is 0."""
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    c = b.op("Squeeze", [cands, i64([1])])                                        # [B, K]
    start = b.op("Sub", [i64([-1]), _dim(b, c, 1)])                              # -(K + 1)
    pred = b.op("Slice", [am, start, i64([INT_MAX]), i64([1])])                  # [B, K + 1]: the argmax chain
    head = b.op("Slice", [pred, i64([0]), i64([-1]), i64([1])])
    # leading matches = the first 0 of [c == head, 0]: one ArgMin instead of a CumSum and a sum (fewer kernels)
    hit = b.op("Pad", [b.op("Cast", [b.op("Equal", [c, head])], to=TensorProto.INT32), i64([0, 0, 0, 1]),
                       b.const(0, np.int32)], mode="constant")                   # [B, K + 1]
    matched = b.op("ArgMin", [hit], axis=1, keepdims=0)                          # [B]
    b.names[node.out("tokens")] = pred
    b.names[node.out("accept_len")] = b.op("Add", [matched, i64(1)])
    b.names[node.out("best")] = b.op("Mul", [matched, i64(0)])


def _draft_loop(b, node, ins):
    """An ONNX Loop over draft_loop_body (lowered with these same rules in a builder of its own): trip count = the
    k input, loop-carried ids, positions, mask, the draft's cache (and seen), the proposals as its scan output.
    The draft's weights live in the body, its only user: onnxruntime pre-packs a subgraph's own initializers, not
    ones it reads from the outer graph (outer weights ran its MatMuls ~2x slower here)."""
    from dgopt.ir.loops import LOOP_CARRIED, draft_loop_body
    body = draft_loop_body(node)
    sub = _Builder(body, b.forwards, b.V)
    for n in body.topo_order():
        sub._cur = n
        LOWERINGS[n.op](sub, n, [sub.names[r] for r in n.inputs])
    carried = [x for x in LOOP_CARRIED if x in body.outputs]
    flat = lambda v: v if isinstance(v, list) else [v]  # noqa: E731 - kv values are lists of tensors
    body_in = [x for n in carried for x in flat(sub.names[body.node(f"{node.id}/{n}").out()])]
    body_out = [x for n in carried for x in flat(sub.names[body.outputs[n]])] + [sub.names[body.outputs["token"]]]
    vi = {v.name: v for v in sub.inputs}
    p = node.id
    cond = f"{p}/cond"          # passed through as the body's output (no Identity kernel per iteration) ...
    stop = sub.names[body.outputs["cond"]] if "cond" in body.outputs else cond    # ... unless the chain can stop
    bool_vi = lambda name: helper.make_tensor_value_info(name, TensorProto.BOOL, [])  # noqa: E731
    graph = helper.make_graph(
        sub.nodes, f"{p}/body",
        [helper.make_tensor_value_info(f"{p}/iter", I64, []), bool_vi(cond)] + [vi[x] for x in body_in],
        [bool_vi(stop)] + [helper.make_tensor_value_info(o, vi[i].type.tensor_type.elem_type, None)
                               for o, i in zip(body_out, body_in)]      # carried: typed as they came in
        + [helper.make_tensor_value_info(body_out[-1], I64, None)],      # the scan output: this iteration's token
        list(sub.inits.values()))
    outer_in = [ins[0], ins[1], ins[2]] + list(ins[3]) + ([ins[5]] if len(ins) > 5 else [])
    outs = b.op("Loop", [ins[4], ""] + outer_in, n_out=len(outer_in) + 1, body=graph)
    n_kv = len(ins[3])
    b.names[node.out("kv")] = outs[3:3 + n_kv]
    b.names[node.out("proposals")] = b.op("Transpose", [outs[-1]], perm=[1, 0])     # [k, B] -> [B, k]


def _confident(b, node, ins):
    # every row's max probability >= t: one row the draft is unsure of ends the batch's chain (at batch 2/4/8 that
    # measured 1.45/0.99/0.81x -> 1.52/1.07/0.91x autoregressive against going on while any row is sure)
    top = b.op("ReduceMin", [b.op("ReduceMax", [b.op("Softmax", [ins[0]], axis=-1), b.const([-1], np.int64)],
                                  keepdims=0)], keepdims=0)
    b.names[node.out()] = b.op("GreaterOrEqual", [top, b.const(node.attrs["threshold"])])


def _trim_block(b, node, ins):
    pos, mask, ids = ins
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    q = _dim(b, ids, 1)                                                           # [1]: q'
    b.names[node.out("positions")] = b.op("Slice", [pos, i64([0]), q, i64([1])])
    # columns: the past (total - q of them) and the block's first q'
    cols = b.op("Add", [b.op("Sub", [_dim(b, mask, 3), _dim(b, mask, 2)]), q])
    b.names[node.out("mask")] = b.op("Slice", [mask, i64([0, 0]), b.op("Concat", [q, cols], axis=0), i64([2, 3])])


def _verify_sample_match(b, node, ins):
    probs, cands, u = ins
    G, K, V = node.attrs["guesses"], node.attrs["length"], b.V
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    cdf = b.op("CumSum", [b.op("Reshape", [probs, i64([-1, 1 + G * K, V])]), i64(-1)])     # [B, 1+G*K, V]
    total = b.op("Slice", [cdf, i64([-1]), i64([V]), i64([-1])])
    u_d = b.op("Gather", [u, i64([0] + list(range(1, K + 1)) * G)], axis=1)              # guesses share u_d
    below = b.op("LessOrEqual", [cdf, b.op("Mul", [b.op("Unsqueeze", [u_d, i64([-1])]), total])])
    drawn = b.op("Min", [b.op("ReduceSum", [b.op("Cast", [below], to=I64), i64([-1])], keepdims=0), i64(V - 1)])
    _accept_chain(b, node, drawn, cands)


def _accept_chain(b, node, am, cands):
    """Longest candidate prefix equal to the chain of chosen tokens am [B, ... 1 + G*K] (argmax or draws)."""
    G, K = node.attrs["guesses"], node.attrs["length"]
    nc = G * K
    ax1, end = b.const([1], np.int64), b.const([INT_MAX], np.int64)
    if nc == 0:
        ox = b.op("Slice", [am, b.const([-1], np.int64), end, ax1])            # [B, 1]
        b.names[node.out("tokens")] = ox
        b.names[node.out("accept_len")] = b.op("Add", [b.op("Mul", [b.op("Squeeze", [ox, ax1]),
                                                                     b.const(0, np.int64)]), b.const(1, np.int64)])
        b.names[node.out("best")] = b.op("Mul", [b.op("Squeeze", [ox, ax1]), b.const(0, np.int64)])
        return
    ox = b.op("Slice", [am, b.const([-(nc + 1)], np.int64), b.const([-nc], np.int64), ax1])       # [B, 1]
    oc = b.op("Reshape", [b.op("Slice", [am, b.const([-nc], np.int64), end, ax1]),
                          b.const([0, G, K], np.int64)])                                            # [B, G, K]
    ox_g = b.op("Expand", [b.op("Unsqueeze", [ox, b.const([2], np.int64)]), b.const([1, G, 1], np.int64)])
    pred = b.op("Concat", [ox_g, oc], axis=2)                                  # [B, G, K+1]: the argmax chains
    head = b.op("Slice", [pred, b.const([0], np.int64), b.const([K], np.int64), b.const([2], np.int64)])
    # float CumSum: TensorRT's CumSum takes no integers (counts <= K are exact in fp32)
    miss = b.op("Cast", [b.op("Not", [b.op("Equal", [cands, head])])], to=F32)
    prefix = b.op("Cast", [b.op("Equal", [b.op("CumSum", [miss, b.const(2, np.int64)]), b.const(0.0)])], to=I64)
    matched = b.op("ReduceSum", [prefix, b.const([2], np.int64)], keepdims=0)  # [B, G]
    best = b.op("ArgMax", [matched], axis=1, keepdims=0)                       # first maximum
    b.names[node.out("best")] = best
    b.names[node.out("accept_len")] = b.op("Add", [b.op("ReduceMax", [matched, b.const([1], np.int64)], keepdims=0),
                                                   b.const(1, np.int64)])
    idx = b.op("Expand", [b.op("Unsqueeze", [best, b.const([1, 2], np.int64)]), b.const([1, 1, K + 1], np.int64)])
    b.names[node.out("tokens")] = b.op("Squeeze", [b.op("GatherElements", [pred, idx], axis=1), ax1])


def _tail_positions(b, node, ins):
    K = node.attrs["length"]
    tail = b.op("Slice", [ins[0], b.const([-(K + 1)], np.int64), b.const([INT_MAX], np.int64),
                          b.const([1], np.int64)])
    b.names[node.out()] = b.op("Reshape", [tail, b.const([-1, b.V], np.int64)])


def _verify_sample(b, node, ins):
    x, cands, q, u_all = ins
    K, V = node.attrs["length"], b.V
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    p = b.op("Reshape", [b.op("Softmax", [x], axis=-1), i64([-1, K + 1, V])])             # [B, K+1, V]
    d = b.op("Reshape", [cands, i64([0, K])])                                              # [B, K]
    d3 = b.op("Unsqueeze", [d, i64([2])])
    p_k = b.op("Slice", [p, i64([0]), i64([K]), i64([1])])
    p_d = b.op("Squeeze", [b.op("GatherElements", [p_k, d3], axis=2), i64([2])])
    q_d = b.op("Squeeze", [b.op("GatherElements", [q, d3], axis=2), i64([2])])
    u = b.op("Slice", [u_all, i64([0]), i64([K]), i64([1])])                              # acceptance tests
    u_res = b.op("Slice", [u_all, i64([K]), i64([K + 1]), i64([1])])                      # the one draw [B, 1]
    rejected = b.op("Cast", [b.op("Not", [b.op("Less", [b.op("Mul", [u, q_d]), p_d])])], to=F32)
    sentinel = b.op("Add", [b.op("Mul", [b.op("Slice", [u, i64([0]), i64([1]), i64([1])]), b.const(0.0)]),
                            b.const(1.0)])                                                 # ones [B, 1]
    n = b.op("ArgMax", [b.op("Concat", [rejected, sentinel], axis=1)], axis=1, keepdims=0,
             select_last_index=0)                                                          # first rejection or K
    first = b.op("Unsqueeze", [b.op("Mul", [n, i64(0)]), i64([1])])                        # zeros [B, 1] int64
    q0 = b.op("Mul", [b.op("Slice", [q, i64([0]), i64([1]), i64([1])]), b.const(0.0)])    # zeros [B, 1, V]
    resid = b.op("Max", [b.op("Sub", [p, b.op("Concat", [q, q0], axis=1)]), b.const(0.0)])
    idx = b.op("Expand", [b.op("Unsqueeze", [n, i64([1, 2])]), i64([1, 1, V])])
    r_n = b.op("Squeeze", [b.op("GatherElements", [resid, idx], axis=1), i64([1])])       # [B, V]
    # p <= q in every float (a measure-zero rejection): draw from p_n rather than from an empty residual
    p_n = b.op("Squeeze", [b.op("GatherElements", [p, idx], axis=1), i64([1])])
    empty = b.op("Cast", [b.op("LessOrEqual", [b.op("ReduceSum", [r_n, i64([-1])], keepdims=1), b.const(0.0)])],
                 to=F32)
    r_n = b.op("Add", [r_n, b.op("Mul", [empty, p_n])])
    cdf = b.op("CumSum", [r_n, i64(-1)])                                                  # inverse CDF of r_n
    below = b.op("LessOrEqual", [cdf, b.op("Mul", [u_res, b.op("Slice", [cdf, i64([-1]), i64([V]), i64([1])])])])
    t = b.op("Min", [b.op("ReduceSum", [b.op("Cast", [below], to=I64), i64([-1])], keepdims=0), i64(V - 1)])
    d_ext = b.op("Concat", [d, first], axis=1)                                             # [B, K+1]
    at_n = b.op("Equal", [i64(np.arange(K + 1)[None]), b.op("Unsqueeze", [n, i64([1])])])
    b.names[node.out("tokens")] = b.op("Where", [at_n, b.op("Unsqueeze", [t, i64([1])]), d_ext])
    b.names[node.out("accept_len")] = b.op("Add", [n, i64(1)])
    b.names[node.out("best")] = b.op("Mul", [n, i64(0)])


LOWERINGS = {
    "input": _input, "forward": _forward, "last_position": _last_position,
    "repetition_penalty": _repetition_penalty, "temperature": _temperature, "top_k": _top_k, "top_p": _top_p,
    "min_p": _min_p, "softmax": _softmax, "argmax": _argmax, "multinomial": _multinomial,
    "sample_top_k": _sample_top_k,
    "random_uniform": _random_uniform, "gumbel_argmax": _gumbel_argmax, "random_gumbel": _random_gumbel,
    "concat_seq": _concat_seq, "merge_masks": _merge_masks, "next_inputs": _next_inputs,
    "to_candidates": _to_candidates,
    "as_seq": _as_seq, "to_target_vocab": _to_target_vocab,
    "repetition_penalty_seq": _repetition_penalty_seq, "mark_seen": _mark_seen,
    "split_seq": _split_seq,
    "split_kv": _split_kv,
    "verify_greedy": _verify_greedy, "tail_positions": _tail_positions, "verify_sample": _verify_sample,
    "verify_sample_match": _verify_sample_match, "draft_loop": _draft_loop,
    "confident": _confident, "trim_block": _trim_block,
}
from .lower_recycle import RECYCLE_LOWERINGS  # noqa: E402 - its rules use the helpers above

LOWERINGS.update(RECYCLE_LOWERINGS)


def lower_to_onnx(g: Graph, forwards: dict, vocab_size: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """Returns (model, io) where io lists the step's inputs/outputs by role for the manifest."""
    if vocab_size is None and "target" in forwards:
        vocab_size = forwards["target"][1]["vocab_size"]
    b = _Builder(g, forwards, vocab_size)
    model = b.build()
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        raise BackendError(f"onnx backend: lowered graph is invalid: {str(e).splitlines()[0]}") from None
    return model, b.io
