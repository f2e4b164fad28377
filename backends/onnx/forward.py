"""Lowering rules for the model forward and what feeds it: step inputs, the inlined exported forward (target or
draft), the last position's logits, and the block plumbing that lets one forward serve two branches (merge_masks,
split_seq, split_kv, concat_seq)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from dgopt.errors import BackendError

from .builder import F16, F32, INT_MAX, Builder, dim, dtname, kv_et, used

__all__ = ["RULES"]

# an fp16 forward gets the additive mask clamped to this before the cast, which would turn the host's fp32 minimum
# into -inf: a finite mask far below any score, as transformers' fp16 masks are finite (finfo.min), so a fully masked
# pad row stays a finite softmax instead of -inf - -inf = NaN
FP16_MASK_MIN = -30000.0
MASK_MIN = float(np.finfo(np.float32).min)


def _input(b: Builder, node, ins):
    vt, name = node.attrs["type"], node.attrs["name"]
    if vt == "kv":     # the cache of the model whose forward reads it (a fused step has target and draft caches)
        models = [u.attrs["model"] for u in b.g.users(node.out()) if u.op in ("forward", "draft_loop")]
        info = b.forwards[models[0] if models else "target"][1]
        names = [f"{name}.{i}.{kv}" for i in range(info["num_layers"]) for kv in ("key", "value")]
        for n in names:
            b.inputs.append(helper.make_tensor_value_info(
                n, kv_et(info), ["batch", info["num_kv_heads"], "past" if name == "past" else f"{name}_len",
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
    b.io["inputs"].append({"name": name, "type": vt, "dtype": dtname(et), "shape": shape})


def _forward(b: Builder, node, ins):
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
    half = kv_et(info) == F16
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


def _last_position(b, node, ins):
    b.names[node.out()] = b.op("Gather", [ins[0], b.const(-1, np.int64)], axis=1)


def _concat_seq(b, node, ins):
    b.names[node.out()] = b.op("Concat", ins, axis=1)


def _merge_masks(b, node, ins):
    ma, mb = ins
    qa, qb = dim(b, ma, 2), dim(b, mb, 2)
    past = b.op("Sub", [dim(b, ma, 3), qa])
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


def _split_seq(b, node, ins):
    x, first = ins
    q1, ax = dim(b, first, 1), b.const([1], np.int64)
    if used(b, node, "head"):
        b.names[node.out("head")] = b.op("Slice", [x, b.const([0], np.int64), q1, ax])
    if used(b, node, "tail"):
        b.names[node.out("tail")] = b.op("Slice", [x, q1, b.const([INT_MAX], np.int64), ax])


def _split_kv(b, node, ins):
    kv, first, second = ins
    qa, qb = dim(b, first, 1), dim(b, second, 1)
    ax, zero, end = b.const([2], np.int64), b.const([0], np.int64), b.const([INT_MAX], np.int64)
    heads, tails = [], []
    for t in kv:
        past = b.op("Sub", [b.op("Sub", [dim(b, t, 2), qa]), qb])
        cut = b.op("Add", [past, qa])
        if used(b, node, "head"):
            heads.append(b.op("Slice", [t, zero, cut, ax]))
        if used(b, node, "tail"):
            tails.append(b.op("Concat", [b.op("Slice", [t, zero, past, ax]), b.op("Slice", [t, cut, end, ax])],
                              axis=2))
    b.names[node.out("head")], b.names[node.out("tail")] = heads, tails


RULES = {
    "input": _input, "forward": _forward, "last_position": _last_position, "concat_seq": _concat_seq,
    "merge_masks": _merge_masks, "split_seq": _split_seq, "split_kv": _split_kv,
}
