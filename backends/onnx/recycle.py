"""Lowering rules of the RecycleGPT ops: the verify forward's hidden states, the chain's start after verification,
the lossy mode's unverified acceptance, the recyclable module (dgopt/models/recycle.py) as plain ONNX ops (one step,
the fused greedy chain, the chain as a Loop of varying length) and the adaptive chain length."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from onnx import TensorProto, helper

from dgopt.errors import BackendError
from dgopt.ir import Graph

from .builder import F32, I64, Builder

__all__ = ["RULES", "forward_hidden"]


def forward_hidden(b, fg, nm, half: bool) -> str:
    """The inlined forward's LM-head input (post final norm): the first input of the MatMul that writes the logits
    (a Cast in between for an fp16 forward is followed back)."""
    producer = {o: n for n in fg.node for o in n.output}
    name = fg.output[0].name
    node = producer.get(name)
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        raise BackendError("onnx backend: the target's exported forward does not end in an LM-head MatMul; its "
                           "hidden states (for strategy recycle) cannot be read")
    h = nm(node.input[0])
    return b.op("Cast", [h], to=F32) if half else h


def _accepted_hidden(b, node, ins):
    hidden, alen, tokens = ins
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    m = b.op("Sub", [alen, i64(1)])                                                   # [B] accepted proposals
    K = node.attrs["length"]
    if K >= 0:      # the last K+1 rows: the x-block's last position and the K candidates
        tail = b.op("Slice", [hidden, i64([-(K + 1)]), i64([2 ** 62]), i64([1])])
        row = m
    else:           # K+1 = tokens' width; row of the last accepted position: T - (K+1) + m
        tail = hidden
        T, K1 = b.op("Shape", [hidden], start=1, end=2), b.op("Shape", [tokens], start=1, end=2)
        row = b.op("Add", [b.op("Sub", [T, K1]), m])
    b.names[node.out("hidden")] = b.op("GatherND", [tail, b.op("Unsqueeze", [row, i64([1])])], batch_dims=1)
    tok = b.op("GatherElements", [tokens, b.op("Unsqueeze", [m, i64([1])])], axis=1)  # [B, 1]
    b.names[node.out("token")] = b.op("Squeeze", [tok, i64([1])])


def _accept_unverified(b, node, ins):
    tokens, alen, cands, trusted = ins
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    d = b.op("Squeeze", [cands, i64([1])])                                            # [B, K]
    d_ext = b.op("Concat", [d, b.op("Slice", [tokens, i64([-1]), i64([2 ** 62]), i64([1])])], axis=1)   # [B, K+1]
    K1 = b.op("Shape", [tokens], start=1, end=2)
    col = b.op("Range", [i64(0), b.op("Squeeze", [K1, i64([0])]), i64(1)])           # [K+1]
    take = b.op("Less", [b.op("Unsqueeze", [col, i64([0])]), b.op("Unsqueeze", [trusted, i64([1])])])
    b.names[node.out("tokens")] = b.op("Where", [take, d_ext, tokens])
    b.names[node.out("accept_len")] = b.op("Max", [alen, b.op("Add", [trusted, i64(1)])])
    b.names[node.out("best")] = b.op("Mul", [alen, i64(0)])


def _rms(b, x: str, w: str, eps: float) -> str:
    """RMSNorm as Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern onnxruntime fuses into one
    SimplifiedLayerNormalization kernel (the chain's cost on a CPU is its kernel count, not its arithmetic)."""
    ms = b.op("ReduceMean", [b.op("Pow", [x, b.const(2.0)]), b.const([-1], np.int64)], keepdims=1)
    return b.op("Mul", [b.op("Div", [x, b.op("Sqrt", [b.op("Add", [ms, b.const(eps)])])]), w])


def _module(b, node):
    """The module's weights as initializers `<module>/<key>` (shared by every step of the chain), its info."""
    name = node.attrs["module"]
    try:
        info = b.forwards[name][1]
    except KeyError:
        raise BackendError(f"onnx backend: node '{node.id}' runs recyclable module '{name}', which the spec does "
                           "not define") from None
    w = info["weights"]

    def init(key: str, value=None, dtype=np.float32) -> str:
        full = f"{name}/{key}"
        if full not in b.inits:
            b.const(w[key] if value is None else value, dtype, name=full)
        return full
    return init, w, info


def _block(b, init, info, h: str, e: str) -> tuple[str, str]:
    """x = fc_h(rms(h)) + e; x += down(silu(gate(rms(x))) * up(rms(x))); h' = norm(x); logits = head(h')."""
    eps = info["eps"]
    x = b.op("Add", [b.op("MatMul", [_rms(b, h, init("norm_h"), eps), init("fc_h")]), e])
    y = _rms(b, x, init("norm_x"), eps)
    gate = b.op("MatMul", [y, init("gate")])
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), b.op("MatMul", [y, init("up")])])
    x = b.op("Add", [x, b.op("MatMul", [act, init("down")])])
    hn = _rms(b, x, init("final_norm"), info["target_eps"])
    return hn, b.op("MatMul", [hn, init("lm_head")])


def _recycle_step(b, node, ins):
    """One step: _block over e = emb_fc[tok] (emb_fc: fc's token half applied to the normed embedding table at
    compile time, one Gather). The module's weights and the target's frozen final norm and LM head are
    initializers named `<module>/...`, shared by every step of the chain."""
    init, w, info = _module(b, node)
    h, tok = ins
    hn, logits = _block(b, init, info, h, b.op("Gather", [init("emb_fc"), tok], axis=0))      # [B, H]
    b.names[node.out("hidden")] = hn
    N = len(w["vocab"]) if "vocab" in w else 0
    users = b.g.users(node.out("logits"))
    if N and users and not b.g.is_output(node.out("logits")) and \
            all(u.op == "sample_top_k" and u.attrs["k"] <= N for u in users):
        # the sampler draws from the N draft-vocabulary scores themselves (its TopK's indices mapped through the
        # vocabulary: the same k largest as in the scattered row, whose other entries sit at the float minimum)
        b.names[node.out("logits")] = logits
        b.__dict__.setdefault("draft_vocab_of", {})[logits] = init("vocab", dtype=np.int64)
        return
    if N:    # a draft vocabulary: its scores scattered into [B, V], every other token at the minimum
        vocab = init("vocab", dtype=np.int64)
        name = node.attrs["module"]
        shared = b.__dict__.setdefault("_recycle_scatter", {})
        if name not in shared:      # [B, V] floor and [B, N] indices: the same for every step of the chain
            floor = b.const(np.full((1, b.V), np.finfo(np.float32).min, np.float32), np.float32,
                            name=f"{name}/floor")
            Bd = b.op("Shape", [h], start=0, end=1)
            shared[name] = (b.op("Expand", [floor, b.op("Concat", [Bd, b.const([b.V], np.int64)], axis=0)]),
                            b.op("Expand", [b.op("Unsqueeze", [vocab, b.const([0], np.int64)]),
                                            b.op("Concat", [Bd, b.const([len(w["vocab"])], np.int64)], axis=0)]))
        base, idx = shared[name]
        logits = b.op("ScatterElements", [base, idx, logits], axis=1)
    b.names[node.out("logits")] = logits


def _recycle_chain(b, node, ins):
    """The greedy chain as one run of [B, 1, H] steps: onnxruntime fuses the 3-D RMSNorms, each step's argmax
    (keepdims) is directly the next step's [B, 1] index, and the draft vocabulary stays the chain's own: the argmax
    runs over its N scores (ascending ids: the first maximum is the token argmax over the scattered [B, V] row would
    choose), later steps gather their embedding from emb_fc's N vocabulary rows, and one Gather maps the k indices
    to token ids at the end. 14 kernels a step for the shipped module, 17 as separate recycle_step nodes."""
    init, w, info = _module(b, node)
    h, tok = ins
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    h = b.op("Unsqueeze", [h, i64([1])])                                               # [B, 1, H]
    tok = b.op("Unsqueeze", [tok, i64([1])])                                           # [B, 1]
    vocab = w.get("vocab")      # ascending and distinct (dgopt.models.recycle.step_weights)
    table = init("emb_fc")
    # after the first step the token is an index into the draft vocabulary: its rows of the table
    later = table if vocab is None else init("emb_fc_vocab", w["emb_fc"][vocab])
    picks = []
    for _ in range(node.attrs["length"]):
        h, logits = _block(b, init, info, h, b.op("Gather", [table, tok], axis=0))      # [B, 1, H], [B, 1, N]
        tok = b.op("ArgMax", [logits], axis=-1, keepdims=0)                            # [B, 1]
        picks.append(tok)
        table = later
    idx = picks[0] if len(picks) == 1 else b.op("Concat", picks, axis=1)              # [B, k]
    b.names[node.out("proposals")] = idx if vocab is None else \
        b.op("Gather", [init("vocab", dtype=np.int64), idx], axis=0)


def _next_chain_length(b, node, ins):
    alen, cands, cap, active = ins
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    K = b.op("Squeeze", [b.op("Shape", [cands], start=2, end=3), i64([0])])                 # []
    # a finished row (active 0) counts as one that accepted all
    alen = b.op("Add", [alen, b.op("Mul", [b.op("Sub", [i64(1), active]), i64(1 << 20)])])
    full = b.op("GreaterOrEqual", [b.op("ReduceMin", [alen], keepdims=0), b.op("Add", [K, i64(1)])])
    up = b.op("Min", [b.op("Add", [K, i64(2)]), cap])
    down = b.op("Max", [b.op("Sub", [K, i64(1)]), i64(1)])
    b.names[node.out()] = b.op("Where", [full, up, down])


def _recycle_loop(b, node, ins):
    """The greedy chain as an ONNX Loop run draft_k times (k_schedule heuristic): loop-carried the hidden state
    [B, 1, H] and the token id [B, 1], the ids its scan output. The body is a chain step of _recycle_chain plus, with
    a draft vocabulary, one Gather of the picked index's id (each iteration starts from an id: the first from the
    bonus token). The module's weights live in the body, their only reader: onnxruntime pre-packs a subgraph's own
    initializers, not ones it reads from the outer graph."""
    h, tok, k = ins
    sub = Builder(Graph(), b.forwards, b.V, b.rules)
    sub._cur = SimpleNamespace(id=f"{node.id}/body", op=node.op, meta=node.meta)
    init, w, info = _module(sub, node)
    p = node.id
    h_in, t_in, it, cond = f"{p}/h", f"{p}/token", f"{p}/iter", f"{p}/cond"
    h2, logits = _block(sub, init, info, h_in, sub.op("Gather", [init("emb_fc"), t_in], axis=0))  # [B,1,H], [B,1,N]
    t2 = sub.op("ArgMax", [logits], axis=-1, keepdims=0)                                          # [B, 1]
    if "vocab" in w:        # the index into the draft vocabulary -> its token id
        t2 = sub.op("Gather", [init("vocab", dtype=np.int64), t2], axis=0)
    scan = sub.op("Squeeze", [t2, sub.const([1], np.int64)])                                      # [B]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        sub.nodes, f"{p}/body",
        [vi(it, I64, []), vi(cond, TensorProto.BOOL, []), vi(h_in, F32, None), vi(t_in, I64, None)],
        [vi(cond, TensorProto.BOOL, []), vi(h2, F32, None), vi(t2, I64, None), vi(scan, I64, None)],
        list(sub.inits.values()))
    i64 = lambda v: b.const(v, np.int64)  # noqa: E731
    outs = b.op("Loop", [k, "", b.op("Unsqueeze", [h, i64([1])]), b.op("Unsqueeze", [tok, i64([1])])], n_out=3,
                body=graph)
    b.names[node.out("proposals")] = b.op("Transpose", [outs[2]], perm=[1, 0])                  # [k, B] -> [B, k]


RULES = {"accepted_hidden": _accepted_hidden, "recycle_step": _recycle_step, "recycle_chain": _recycle_chain,
         "recycle_loop": _recycle_loop, "next_chain_length": _next_chain_length, "accept_unverified": _accept_unverified}
