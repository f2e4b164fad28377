"""Lowering rules for verification: the repetition penalty at every verified position, the verified tail of the
scores, and the acceptance ops (verify_greedy, verify_sample_match: the longest candidate prefix equal to the
model's chosen chain; verify_sample: rejection sampling against the draft's q)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .builder import F32, I64, INT_MAX, dim
from .sampling import penalized, penalized_where_seen

__all__ = ["RULES"]


def _repetition_penalty_seq(b, node, ins):
    x, seen, cands = ins
    p, i64 = node.attrs["penalty"], (lambda v: b.const(v, np.int64))  # noqa: E731
    K = dim(b, cands, 2)
    nc = b.op("Mul", [dim(b, cands, 1), K])                                       # G*K
    head_end = b.op("Sub", [dim(b, x, 1), b.op("Add", [nc, i64([1])])])          # rows before the verified tail
    tail = b.op("Slice", [x, head_end, i64([INT_MAX]), i64([1])])                  # [B, 1+G*K, V]
    by_seen = penalized_where_seen(b, tail, b.op("Unsqueeze", [seen, i64([1])]), p)
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
                           penalized(b, b.op("GatherElements", [b.op("Slice", [tail, i64([1]), i64([INT_MAX]),
                                                                                  i64([1])]), own], axis=2), p)],
                          axis=1)
    idx = b.op("Concat", [x_idx, own], axis=1)                                     # [B, 1+G*K, K]
    out_tail = b.op("ScatterElements", [by_seen, idx, vals], axis=2)
    b.names[node.out()] = b.op("Concat", [b.op("Slice", [x, i64([0]), head_end, i64([1])]), out_tail], axis=1)


def _tail_positions(b, node, ins):
    K = node.attrs["length"]
    tail = b.op("Slice", [ins[0], b.const([-(K + 1)], np.int64), b.const([INT_MAX], np.int64),
                          b.const([1], np.int64)])
    b.names[node.out()] = b.op("Reshape", [tail, b.const([-1, b.V], np.int64)])


def _verify_greedy(b, node, ins):
    logits, cands = ins
    am = b.op("ArgMax", [logits], axis=-1, keepdims=0)                              # [B, k + G*K]
    if node.attrs["length"] == -1:
        _accept_one_chain(b, node, am, cands)
    else:
        _accept_chain(b, node, am, cands)


def _accept_one_chain(b, node, am, cands):
    """_accept_chain for one candidate whose length K is read off its shape [B, 1, K] (a draft_loop's proposals: K
    varies per step; any single candidate: 10 kernels against _accept_chain's 20). best is 0."""
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    c = b.op("Squeeze", [cands, i64([1])])                                        # [B, K]
    start = b.op("Sub", [i64([-1]), dim(b, c, 1)])                              # -(K + 1)
    pred = b.op("Slice", [am, start, i64([INT_MAX]), i64([1])])                  # [B, K + 1]: the argmax chain
    head = b.op("Slice", [pred, i64([0]), i64([-1]), i64([1])])
    # leading matches = the first 0 of [c == head, 0]: one ArgMin instead of a CumSum and a sum (fewer kernels)
    hit = b.op("Pad", [b.op("Cast", [b.op("Equal", [c, head])], to=TensorProto.INT32), i64([0, 0, 0, 1]),
                       b.const(0, np.int32)], mode="constant")                   # [B, K + 1]
    matched = b.op("ArgMin", [hit], axis=1, keepdims=0)                          # [B]
    b.names[node.out("tokens")] = pred
    b.names[node.out("accept_len")] = b.op("Add", [matched, i64(1)])
    b.names[node.out("best")] = b.op("Mul", [matched, i64(0)])


def _accept_chain(b, node, am, cands):
    """Longest candidate prefix equal to the chain of chosen tokens am [B, ... 1 + G*K] (argmax or draws)."""
    G, K = node.attrs["guesses"], node.attrs["length"]
    nc = G * K
    if G == 1 and K > 0:    # one candidate: no best-of-G, half the kernels
        return _accept_one_chain(b, node, am, cands)
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
    idx = b.op("Expand", [b.op("Unsqueeze", [n, i64([1, 2])]), i64([1, 1, V])])
    p_n = b.op("Squeeze", [b.op("GatherElements", [p, idx], axis=1), i64([1])])           # [B, V]
    q_n = b.op("Squeeze", [b.op("GatherElements", [b.op("Concat", [q, q0], axis=1), idx], axis=1), i64([1])])
    r_n = b.op("Max", [b.op("Sub", [p_n, q_n]), b.const(0.0)])     # the residual of row n only, not of all K+1
    # p <= q in every float (a measure-zero rejection): draw from p_n rather than from an empty residual
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


RULES = {
    "repetition_penalty_seq": _repetition_penalty_seq, "tail_positions": _tail_positions,
    "verify_greedy": _verify_greedy, "verify_sample_match": _verify_sample_match, "verify_sample": _verify_sample,
}
