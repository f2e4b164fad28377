"""A Llama-family forward (Llama, Qwen2) written directly as a small ONNX graph from the model's weights.

Same interface as the traced export (`hf.export_forward`): (input_ids, position_ids, attn_mask, past.*) ->
(logits, present.*), the same arithmetic as transformers' eager forward, op for op, in about half the nodes: the
tracer's shape bookkeeping (Shape/Gather/Unsqueeze/Concat chains) is gone, q, k and v come from one MatMul, gate and
up from another, and the rotary embedding is applied to q and k together with one Gather for rotate_half. For
models this small every kernel launch shows in the step time (a speculative step runs the draft's forward k times),
which is why this exists.

`contrib=True` halves the kernels again with onnxruntime's contrib ops (domain com.microsoft): MultiHeadAttention
(KV concat, scores, additive mask, softmax, weighted sum and head merge in one kernel), RotaryEmbedding (angles
from a cos/sin table over the model's positions instead of computed per forward) and SkipSimplifiedLayerNormalization
(each residual add fused into the next RMSNorm). onnxruntime only: TensorRT's parser does not know these ops, and
the arithmetic is the same up to float rounding, not op for op. Grouped-query attention: MultiHeadAttention has one
head count, so it runs over the kv heads with each kv head's g query heads folded into the query sequence (g blocks
of q rows under the same mask rows); the cache keeps its [B, Hkv, T, D] layout and no key is copied. (onnxruntime's
GroupQueryAttention keeps its own cache bookkeeping, seqlens_k and a right-padded past, which dgopt's explicit mask
with holes does not fit.)

Qwen2's sliding-window layers (use_sliding_window, from max_window_layers on) get a second mask, derived in the graph
from the given one (see `direct_forward`): the forward's interface and the runtime's masks are unchanged."""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

__all__ = ["direct_forward", "unsupported_reason", "layer_types", "sliding_window"]

MS = "com.microsoft"     # onnxruntime's contrib op domain
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")     # inv_freq and attention_scaling fixed at load time


def unsupported_reason(lm, dtype: str, contrib: bool = False) -> str | None:
    """Why `lm` cannot be written directly, with contrib ops if `contrib` (None: it can)."""
    if lm.family not in ("llama", "qwen2"):
        return f"family {lm.family} (direct: llama, qwen2)"
    if dtype != "float32":
        return f"precision {dtype} (direct: fp32)"
    c, m = lm.model.config, lm.model.model
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"hidden_act {c.hidden_act}"
    rope = getattr(m.rotary_emb, "rope_type", "default")
    if rope not in _STATIC_ROPE:
        return f"rope type {rope} (its frequencies depend on the sequence length)"
    if getattr(lm.model.get_output_embeddings(), "bias", None) is not None:
        return "lm_head bias"
    other = set(layer_types(c)) - {"full_attention", "sliding_attention"}
    if other:
        return f"layer type {sorted(other)[0]}"
    if contrib and not getattr(c, "max_position_embeddings", 0):
        return "no max_position_embeddings (contrib: the rotary table's size)"
    return None


def layer_types(c) -> list[str]:
    """Each layer's attention as transformers decides it (Qwen2: sliding_attention from max_window_layers on, when
    use_sliding_window; its config resolves that into layer_types)."""
    return list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)


def sliding_window(c) -> int | None:
    """The window of the sliding layers, None when no layer slides."""
    return int(c.sliding_window) if "sliding_attention" in layer_types(c) else None


class _G:
    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def init(self, name: str, arr, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(arr, dtype)), name))
        return name

    def ints(self, name: str, values) -> str:
        return self.init(name, np.array(values, np.int64), np.int64)

    def op(self, op_type: str, inputs: list[str], n: int = 1, name: str | None = None, out: str | None = None,
           **attrs):
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = [out] if out else [f"{base}:{i}" for i in range(n)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, **attrs))
        return outs if n > 1 else outs[0]


def direct_forward(lm, contrib: bool = False):
    """ModelProto of one fp32 forward of a Llama / Qwen2 model (check `unsupported_reason` first)."""
    model = lm.model
    c, m = model.config, model.model
    Hq, Hkv = c.num_attention_heads, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // Hq
    inter, groups = c.intermediate_size, Hq // Hkv
    g = _G()

    def w(t):
        return t.detach().float().numpy()

    eps, two, one = g.init("rms_eps", np.float32(c.rms_norm_eps)), g.init("two", np.float32(2)), g.init("one", 1.0)
    last = g.ints("axis_last", [-1])

    def rms(x, weight, name):
        # transformers: weight * (x * rsqrt(mean(x^2) + eps)); onnxruntime fuses this chain into one kernel
        var = g.op("ReduceMean", [g.op("Pow", [x, two], name=f"{name}/Pow"), last], name=f"{name}/ReduceMean",
                   keepdims=1)
        inv = g.op("Div", [one, g.op("Sqrt", [g.op("Add", [var, eps], name=f"{name}/Add")], name=f"{name}/Sqrt")],
                   name=f"{name}/Div")
        return g.op("Mul", [g.op("Mul", [x, inv], name=f"{name}/Mul"), g.init(f"{name}.weight", w(weight))],
                    name=f"{name}/Scale")

    def add_norm(x, delta, weight, name):
        """(x + delta, rms(x + delta)): the residual stream and the next block's input. contrib: one kernel."""
        if delta is None:
            return x, rms(x, weight, name)
        if not contrib:
            x = g.op("Add", [x, delta], name=f"{name}/residual")
            return x, rms(x, weight, name)
        y, _, _, x = g.op("SkipSimplifiedLayerNormalization", [x, delta, g.init(f"{name}.weight", w(weight))], n=4,
                          name=name, domain=MS, epsilon=float(c.rms_norm_eps))
        return x, y

    def bias(y, mod, name):
        return y if mod.bias is None else g.op("Add", [y, g.init(f"{name}.bias", w(mod.bias))], name=f"{name}/bias")

    x = g.op("Gather", [g.init("embed_tokens.weight", w(m.embed_tokens.weight)), "input_ids"], name="embed")
    rot = m.rotary_emb
    inv = rot.inv_freq.detach().float()
    h2 = D // 2
    if contrib:
        # the angles of every position the model has, computed as transformers' rotary module does (fp32 product,
        # torch cos/sin, attention_scaling); RotaryEmbedding gathers them by position_ids
        ang = torch.arange(c.max_position_embeddings, dtype=torch.float32)[:, None] * inv[None, :]
        cos_t = g.init("rope.cos", (ang.cos() * rot.attention_scaling).numpy())
        sin_t = g.init("rope.sin", (ang.sin() * rot.attention_scaling).numpy())
    else:
        # rotary angles once per forward, as transformers' rotary module: position (float) * inv_freq, [B, 1, q, D]
        pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], name="rope/Cast",
                                      to=TensorProto.FLOAT), g.ints("axes_1_3", [1, 3])], name="rope/Unsqueeze")
        ang = g.op("Mul", [pos, g.init("rope.inv_freq", np.concatenate([inv.numpy(), inv.numpy()]))],
                   name="rope/angles")
        cos, sin = g.op("Cos", [ang], name="rope/Cos"), g.op("Sin", [ang], name="rope/Sin")
        if float(rot.attention_scaling) != 1.0:
            s = g.init("rope.attention_scaling", np.float32(rot.attention_scaling))
            cos, sin = g.op("Mul", [cos, s], name="rope/cos_scale"), g.op("Mul", [sin, s], name="rope/sin_scale")
        # rotate_half(x) * sin == swap_halves(x) * (sin with its first half negated): negation is exact, so this is
        # transformers' arithmetic bit for bit, with one Gather instead of Slice/Neg/Concat per tensor
        sin = g.op("Mul", [sin, g.init("rope.sign", np.r_[-np.ones(h2), np.ones(D - h2)])], name="rope/signed_sin")
        swap = g.ints("rope.swap_halves", np.r_[np.arange(h2, D), np.arange(h2)])

    scaling = float(model.model.layers[0].self_attn.scaling)
    if contrib:
        qkv_split = g.ints("split_q_k_v", [Hq * D, Hkv * D, Hkv * D])
    else:
        scaling_t = g.init("attn_scaling", np.float32(scaling))
        heads = g.ints("shape_heads", [0, 0, -1, D])
        merged = g.ints("shape_merged", [0, 0, Hq * D])
        slots = g.ints("split_qkv", [Hq + Hkv, Hkv])
        qk_split = g.ints("split_qk", [Hq, Hkv])
    gu_split = g.ints("split_gate_up", [inter, inter])
    if groups > 1:      # grouped-query attention: query heads of one kv head side by side instead of repeat_kv
        to_groups, to_heads = g.ints("shape_kv_groups", [0, Hkv, -1, 0]), g.ints("shape_q_heads", [0, Hq, -1, 0])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "q"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "q"]),
              helper.make_tensor_value_info("attn_mask", TensorProto.FLOAT, ["batch", 1, "q", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "q", int(c.vocab_size)])]

    masks = {"full_attention": "attn_mask"}
    window = sliding_window(c)
    if window is not None:
        # transformers masks key k for query q where q - k >= window (cache indices of one unpadded row, i.e.
        # positions). dgopt's mask has holes (padding, rejected proposals) and no key positions; a query's visible
        # keys are its sequence, one per position, in slot order: the key with n visible keys after it lies n
        # positions back. Mask those with n >= window.
        seen = g.op("Cast", [g.op("Greater", ["attn_mask", g.init("minus_one", np.float32(-1))], name="window/seen")],
                    name="window/seen_f", to=TensorProto.FLOAT)
        after = g.op("CumSum", [seen, g.ints("axis_last_scalar", -1)], name="window/after", exclusive=1, reverse=1)
        old = g.op("GreaterOrEqual", [after, g.init("window", np.float32(window))], name="window/old")
        masks["sliding_attention"] = g.op("Where", [old, g.init("masked", np.finfo(np.float32).min), "attn_mask"],
                                          name="window/mask")
    if contrib and groups > 1:
        # MultiHeadAttention has one head count: the g query heads of a kv head become g blocks of the query
        # sequence ([B, g*q, Hkv*D], block j holds heads h*g + j), each block under the same mask rows
        masks = {t: g.op("Tile", [mk, g.ints("tile_groups", [1, 1, groups, 1])], name=f"{t}/groups")
                 for t, mk in masks.items()}
        q_groups = g.ints("shape_q_groups", [0, 0, Hkv, groups, D])
        q_folded = g.ints("shape_q_folded", [0, -1, Hkv * D])
        o_groups = g.ints("shape_o_groups", [0, groups, -1, Hkv, D])
        o_merged = g.ints("shape_o_merged", [0, 0, Hq * D])

    def attention(y, names, p, mask):
        """[B, q, (Hq + 2 Hkv) D] projections -> [B, q, Hq D] attention output; the cache outputs get their names."""
        if contrib:
            q, k, v = g.op("Split", [y, qkv_split], n=3, name=f"{p}.split", axis=-1)
            q = g.op("RotaryEmbedding", [q, "position_ids", cos_t, sin_t], name=f"{p}.rope_q", domain=MS,
                     num_heads=Hq, interleaved=0)
            k = g.op("RotaryEmbedding", [k, "position_ids", cos_t, sin_t], name=f"{p}.rope_k", domain=MS,
                     num_heads=Hkv, interleaved=0)
            if groups > 1:
                q = g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [q, q_groups], name=f"{p}.q_groups")],
                                          name=f"{p}.q_groups/T", perm=[0, 3, 1, 2, 4]), q_folded],
                         name=f"{p}.q_folded")
            o = g.op("MultiHeadAttention", [q, k, v, "", "", mask, names["key"][0], names["value"][0]], n=3,
                     name=f"{p}.attention", domain=MS, num_heads=Hkv, scale=scaling)
            g.nodes[-1].output[1:] = [names["key"][1], names["value"][1]]
            if groups == 1:
                return o[0]
            o = g.op("Transpose", [g.op("Reshape", [o[0], o_groups], name=f"{p}.o_groups")], name=f"{p}.o_groups/T",
                     perm=[0, 2, 3, 1, 4])
            return g.op("Reshape", [o, o_merged], name=f"{p}.o_merged")
        y = g.op("Transpose", [g.op("Reshape", [y, heads], name=f"{p}.heads")], name=f"{p}.heads/T",
                 perm=[0, 2, 1, 3])                                               # [B, Hq + 2 Hkv, q, D]
        qk, v = g.op("Split", [y, slots], n=2, name=f"{p}.split", axis=1)
        swapped = g.op("Gather", [qk, swap], name=f"{p}.rope/swap", axis=3)
        qk = g.op("Add", [g.op("Mul", [qk, cos], name=f"{p}.rope/cos"), g.op("Mul", [swapped, sin],
                                                                            name=f"{p}.rope/sin")], name=f"{p}.rope")
        q, k = g.op("Split", [qk, qk_split], n=2, name=f"{p}.split_qk", axis=1)
        K = g.op("Concat", [names["key"][0], k], name=f"{p}.cache_key", out=names["key"][1], axis=2)
        V = g.op("Concat", [names["value"][0], v], name=f"{p}.cache_value", out=names["value"][1], axis=2)
        if groups > 1:
            q = g.op("Reshape", [q, to_groups], name=f"{p}.q_groups")
        s = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [K], name=f"{p}.keys_T", perm=[0, 1, 3, 2])],
                              name=f"{p}.scores"), scaling_t], name=f"{p}.scores/scale")
        if groups > 1:
            s = g.op("Reshape", [s, to_heads], name=f"{p}.scores/heads")
        pr = g.op("Softmax", [g.op("Add", [s, mask], name=f"{p}.mask")], name=f"{p}.softmax", axis=-1)
        if groups > 1:
            pr = g.op("Reshape", [pr, to_groups], name=f"{p}.probs/groups")
        o = g.op("MatMul", [pr, V], name=f"{p}.attend")
        if groups > 1:
            o = g.op("Reshape", [o, to_heads], name=f"{p}.attend/heads")
        return g.op("Reshape", [g.op("Transpose", [o], name=f"{p}.merge/T", perm=[0, 2, 1, 3]), merged],
                    name=f"{p}.merge")                                            # [B, q, Hq*D]

    delta = None        # the last block's output, not yet added to the residual stream x
    types = layer_types(c)
    for i, layer in enumerate(m.layers):
        a, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}"
        names = {kv: (f"past.{i}.{kv}", f"present.{i}.{kv}") for kv in ("key", "value")}
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(names[kv][0], TensorProto.FLOAT, ["batch", Hkv, "past", D]))
            outputs.append(helper.make_tensor_value_info(names[kv][1], TensorProto.FLOAT, ["batch", Hkv, "total", D]))
        x, h = add_norm(x, delta, layer.input_layernorm.weight, f"{p}.input_layernorm")
        proj = (a.q_proj, a.k_proj, a.v_proj)
        y = g.op("MatMul", [h, g.init(f"{p}.qkv.weight", np.concatenate([w(t.weight).T for t in proj], 1))],
                 name=f"{p}.qkv")
        if a.q_proj.bias is not None:
            y = g.op("Add", [y, g.init(f"{p}.qkv.bias", np.concatenate([w(t.bias) for t in proj]))],
                     name=f"{p}.qkv/bias")
        o = g.op("MatMul", [attention(y, names, p, masks[types[i]]), g.init(f"{p}.o_proj.weight", w(a.o_proj.weight).T)],
                 name=f"{p}.o_proj")
        x, h = add_norm(x, bias(o, a.o_proj, f"{p}.o_proj"), layer.post_attention_layernorm.weight,
                        f"{p}.post_attention_layernorm")
        gu = g.op("MatMul", [h, g.init(f"{p}.gate_up.weight", np.concatenate(
            [w(mlp.gate_proj.weight).T, w(mlp.up_proj.weight).T], 1))], name=f"{p}.gate_up")
        if mlp.gate_proj.bias is not None:
            gu = g.op("Add", [gu, g.init(f"{p}.gate_up.bias", np.concatenate(
                [w(mlp.gate_proj.bias), w(mlp.up_proj.bias)]))], name=f"{p}.gate_up/bias")
        gate, up = g.op("Split", [gu, gu_split], n=2, name=f"{p}.split_gate_up", axis=-1)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}.silu/Sigmoid")], name=f"{p}.silu")
        d = g.op("MatMul", [g.op("Mul", [act, up], name=f"{p}.gated"), g.init(f"{p}.down_proj.weight",
                                                                          w(mlp.down_proj.weight).T)],
                 name=f"{p}.down_proj")
        delta = bias(d, mlp.down_proj, f"{p}.down_proj")
    _, h = add_norm(x, delta, m.norm.weight, "norm")
    head = model.get_output_embeddings()
    g.op("MatMul", [h, g.init("lm_head.weight", w(head.weight).T)], name="lm_head", out="logits")
    graph = helper.make_graph(g.nodes, f"{lm.family}_forward", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(MS, 1)] if contrib else [])
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="dgopt.direct")
    proto.ir_version = 10
    return proto
