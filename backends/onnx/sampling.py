"""Lowering rules for the logits processors and samplers (Hugging Face's order and arithmetic): repetition
penalty, temperature, top-k, top-p, min-p, softmax, argmax, inverse-CDF multinomial, fused top-k sampling, and the
in-graph noise of Gumbel sampling."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .builder import F32, I64

__all__ = ["RULES", "penalized", "penalized_where_seen"]


def neg_fill(b, remove: str, x: str) -> str:
    # min(x, +inf where kept, -inf where removed): exact, and ~3x cheaper than Where on ORT's CPU EP
    keep = b.op("Cast", [b.op("Not", [remove])], to=F32)
    return b.op("Min", [x, b.op("Mul", [b.op("Sub", [keep, b.const(0.5)]), b.const(np.inf)])])


def penalized(b, x: str, p: float) -> str:
    """HF's rule (x > 0: x / p, else x * p) as min(x/p, x*p) for p > 1 (max for p < 1): the same two roundings,
    without Where, which on ORT's CPU EP costs ~15x a Mul (183 vs 12 ms over 19.5M floats)."""
    return b.op("Min" if p > 1 else "Max", [b.op("Div", [x, b.const(p)]), b.op("Mul", [x, b.const(p)])])


def penalized_where_seen(b, x: str, seen: str, p: float) -> str:
    """seen > 0 ? penalized(x) : x, exactly: for p > 1 penalized(x) <= x, so min(x, max(penalized(x), c)) with
    c = +inf where unseen and -inf where seen (for p < 1 the mirror image); c = (unseen - 0.5) * inf is never 0*inf."""
    unseen = b.op("Cast", [b.op("LessOrEqual", [seen, b.const(0.0)])], to=F32)
    c = b.op("Mul", [b.op("Sub", [unseen, b.const(0.5)]), b.const(np.inf if p > 1 else -np.inf)])
    inner, outer = ("Max", "Min") if p > 1 else ("Min", "Max")
    return b.op(outer, [x, b.op(inner, [penalized(b, x, p), c])])


def _repetition_penalty(b, node, ins):
    x, seen = ins
    b.names[node.out()] = penalized_where_seen(b, x, seen, node.attrs["penalty"])


def _temperature(b, node, ins):
    b.names[node.out()] = b.op("Div", [ins[0], b.const(node.attrs["value"])])


def _top_k(b, node, ins):
    k = min(node.attrs["k"], b.V)
    values, _ = b.op("TopK", [ins[0], b.const([k], np.int64)], n_out=2, axis=-1, largest=1, sorted=1)
    kth = b.op("Slice", [values, b.const([k - 1], np.int64), b.const([k], np.int64), b.const([-1], np.int64)])
    b.names[node.out()] = neg_fill(b, b.op("Less", [ins[0], kth]), ins[0])


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
    b.names[node.out()] = neg_fill(b, b.op("Cast", [drop], to=TensorProto.BOOL), ins[0])


def _min_p(b, node, ins):
    probs = b.op("Softmax", [ins[0]], axis=-1)
    top = b.op("ReduceMax", [probs, b.const([-1], np.int64)], keepdims=1)
    thr = b.op("Mul", [top, b.const(node.attrs["p"])])
    b.names[node.out()] = neg_fill(b, b.op("Less", [probs, thr]), ins[0])


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
    vocab = getattr(b, "draft_vocab_of", {}).get(x)     # x: a recycle module's [B, N] draft-vocabulary scores
    if vocab is not None:
        idx = b.op("Gather", [vocab, idx], axis=0)
    sm = b.op("Softmax", [b.op("Div", [vals, b.const(node.attrs["temperature"])])], axis=-1)
    cdf = b.op("CumSum", [sm, i64(-1)])
    thr = b.op("Mul", [b.op("Unsqueeze", [u, i64([-1])]), b.op("Slice", [cdf, i64([-1]), i64([k]), i64([-1])])])
    j = b.op("Min", [b.op("ReduceSum", [b.op("Cast", [b.op("LessOrEqual", [cdf, thr])], to=I64), i64([-1])],
                          keepdims=1), i64(k - 1)])
    b.names[node.out("token")] = b.op("Squeeze", [b.op("GatherElements", [idx, j], axis=1), i64([1])])
    zeros = b.op("Expand", [b.const(np.zeros((1, b.V), np.float32)),                     # x may hold -inf: no x*0
                            b.op("Shape", [x]) if vocab is None else
                            b.op("Concat", [b.op("Shape", [x], start=0, end=1), i64([b.V])], axis=0)])
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


RULES = {
    "repetition_penalty": _repetition_penalty, "temperature": _temperature, "top_k": _top_k, "top_p": _top_p,
    "min_p": _min_p, "softmax": _softmax, "argmax": _argmax, "multinomial": _multinomial,
    "sample_top_k": _sample_top_k, "random_uniform": _random_uniform, "gumbel_argmax": _gumbel_argmax,
    "random_gumbel": _random_gumbel,
}
