"""Lowering rules for a draft's chain: feeding each proposal back (next_inputs), the draft's scores over the
target's vocabulary, its penalty bookkeeping, its proposals as the verifier's candidates, and the chain as an ONNX
Loop (draft_loop) with its early stop (confident, trim_block)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .builder import F32, I64, INT_MAX, Builder, dim, used

__all__ = ["RULES"]

NEG_INF = float("-inf")


def _next_inputs(b, node, ins):
    tok, pos, mask = ins
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    if used(b, node, "ids"):
        b.names[node.out("ids")] = b.op("Unsqueeze", [tok, i64([1])])
    if used(b, node, "positions"):
        b.names[node.out("positions")] = b.op("Add", [b.op("Slice", [pos, i64([-1]), i64([INT_MAX]), i64([1])]),
                                                      i64(1)])
    if used(b, node, "mask"):       # the last query row, and the new token sees itself: one more 0 column
        row = b.op("Slice", [mask, i64([-1]), i64([INT_MAX]), i64([2])])                # [B, 1, 1, total]
        b.names[node.out("mask")] = b.op("Pad", [row, i64([0, 0, 0, 0, 0, 0, 0, 1]), b.const(0.0)],
                                         mode="constant")


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


def _mark_seen(b, node, ins):
    seen, tok = ins
    idx = b.op("Unsqueeze", [tok, b.const([1], np.int64)])                                 # [B, 1]
    ones = b.op("Add", [b.op("Mul", [b.op("Cast", [idx], to=F32), b.const(0.0)]), b.const(1.0)])
    b.names[node.out()] = b.op("ScatterElements", [seen, idx, ones], axis=1)


def _as_seq(b, node, ins):
    b.names[node.out()] = b.op("Unsqueeze", [ins[0], b.const([1], np.int64)])


def _to_candidates(b, node, ins):
    props = ins[0]
    ids = b.op("Where", [b.op("Less", [props, b.const(b.V, np.int64)]), props, b.const(0, np.int64)])
    b.names[node.out("ids")] = ids
    b.names[node.out("candidates")] = b.op("Unsqueeze", [ids, b.const([1], np.int64)])


def _trim_block(b, node, ins):
    pos, mask, ids = ins
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    q = dim(b, ids, 1)                                                           # [1]: q'
    b.names[node.out("positions")] = b.op("Slice", [pos, i64([0]), q, i64([1])])
    # columns: the past (total - q of them) and the block's first q'
    cols = b.op("Add", [b.op("Sub", [dim(b, mask, 3), dim(b, mask, 2)]), q])
    b.names[node.out("mask")] = b.op("Slice", [mask, i64([0, 0]), b.op("Concat", [q, cols], axis=0), i64([2, 3])])


def _confident(b, node, ins):
    # every row's max probability >= t: one row the draft is unsure of ends the batch's chain (at batch 2/4/8 that
    # measured 1.45/0.99/0.81x -> 1.52/1.07/0.91x autoregressive against going on while any row is sure)
    top = b.op("ReduceMin", [b.op("ReduceMax", [b.op("Softmax", [ins[0]], axis=-1), b.const([-1], np.int64)],
                                  keepdims=0)], keepdims=0)
    b.names[node.out()] = b.op("GreaterOrEqual", [top, b.const(node.attrs["threshold"])])


def _draft_loop(b, node, ins):
    """An ONNX Loop over draft_loop_body (lowered with these same rules in a builder of its own): trip count = the
    k input, loop-carried ids, positions, mask, the draft's cache (and seen), the proposals as its scan output.
    The draft's weights live in the body, its only user: onnxruntime pre-packs a subgraph's own initializers, not
    ones it reads from the outer graph (outer weights ran its MatMuls ~2x slower here)."""
    from dgopt.ir.loops import LOOP_CARRIED, draft_loop_body
    body = draft_loop_body(node)
    sub = Builder(body, b.forwards, b.V, b.rules)
    for n in body.topo_order():
        sub._cur = n
        sub.rules[n.op](sub, n, [sub.names[r] for r in n.inputs])
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


RULES = {
    "next_inputs": _next_inputs, "to_target_vocab": _to_target_vocab, "mark_seen": _mark_seen, "as_seq": _as_seq,
    "to_candidates": _to_candidates, "trim_block": _trim_block, "confident": _confident, "draft_loop": _draft_loop,
}
