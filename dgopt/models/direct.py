"""A Llama-family forward (Llama, Qwen2) written directly as a small ONNX graph from the model's weights.

Same interface as the traced export (`hf.export_forward`): (input_ids, position_ids, attn_mask, past.*) ->
(logits, present.*), the same arithmetic as transformers' eager forward, op for op, in about half the nodes: the
tracer's shape bookkeeping (Shape/Gather/Unsqueeze/Concat chains) is gone, q, k and v come from one MatMul, gate and
up from another, and the rotary embedding is applied to q and k together with one Gather for rotate_half. For
models this small every kernel launch shows in the step time (a speculative step runs the draft's forward k times),
which is why this exists."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

__all__ = ["direct_forward", "unsupported_reason"]

_STATIC_ROPE = ("default", "linear", "llama3", "yarn")     # inv_freq and attention_scaling fixed at load time


def unsupported_reason(lm, dtype: str) -> str | None:
    """Why `lm` cannot be written directly (None: it can)."""
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
    if any(t != "full_attention" for t in (getattr(c, "layer_types", None) or [])) or \
            getattr(c, "use_sliding_window", False):
        return "sliding-window attention"
    return None


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


def direct_forward(lm):
    """ModelProto of one fp32 forward of a Llama / Qwen2 model (check `unsupported_reason` first)."""
    model = lm.model
    c, m = model.config, model.model
    L, Hq, Hkv = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // Hq
    hid, inter, groups = c.hidden_size, c.intermediate_size, Hq // Hkv
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

    x = g.op("Gather", [g.init("embed_tokens.weight", w(m.embed_tokens.weight)), "input_ids"], name="embed")
    # rotary angles once per forward, as transformers' rotary module: position (float) * inv_freq, [B, 1, q, D]
    rot = m.rotary_emb
    inv = rot.inv_freq.detach().float().numpy()
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], name="rope/Cast",
                                  to=TensorProto.FLOAT), g.ints("axes_1_3", [1, 3])], name="rope/Unsqueeze")
    ang = g.op("Mul", [pos, g.init("rope.inv_freq", np.concatenate([inv, inv]))], name="rope/angles")
    cos, sin = g.op("Cos", [ang], name="rope/Cos"), g.op("Sin", [ang], name="rope/Sin")
    if float(rot.attention_scaling) != 1.0:
        s = g.init("rope.attention_scaling", np.float32(rot.attention_scaling))
        cos, sin = g.op("Mul", [cos, s], name="rope/cos_scale"), g.op("Mul", [sin, s], name="rope/sin_scale")
    # rotate_half(x) * sin == swap_halves(x) * (sin with its first half negated): negation is exact, so this is
    # transformers' arithmetic bit for bit, with one Gather instead of Slice/Neg/Concat per tensor
    h2 = D // 2
    sin = g.op("Mul", [sin, g.init("rope.sign", np.r_[-np.ones(h2), np.ones(D - h2)])], name="rope/signed_sin")
    swap = g.ints("rope.swap_halves", np.r_[np.arange(h2, D), np.arange(h2)])

    scaling = g.init("attn_scaling", np.float32(model.model.layers[0].self_attn.scaling))
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

    for i, layer in enumerate(m.layers):
        a, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}"
        names = {kv: (f"past.{i}.{kv}", f"present.{i}.{kv}") for kv in ("key", "value")}
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(names[kv][0], TensorProto.FLOAT, ["batch", Hkv, "past", D]))
            outputs.append(helper.make_tensor_value_info(names[kv][1], TensorProto.FLOAT, ["batch", Hkv, "total", D]))
        h = rms(x, layer.input_layernorm.weight, f"{p}.input_layernorm")
        proj = (a.q_proj, a.k_proj, a.v_proj)
        y = g.op("MatMul", [h, g.init(f"{p}.qkv.weight", np.concatenate([w(t.weight).T for t in proj], 1))],
                 name=f"{p}.qkv")
        if a.q_proj.bias is not None:
            y = g.op("Add", [y, g.init(f"{p}.qkv.bias", np.concatenate([w(t.bias) for t in proj]))],
                     name=f"{p}.qkv/bias")
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
                              name=f"{p}.scores"), scaling], name=f"{p}.scores/scale")
        if groups > 1:
            s = g.op("Reshape", [s, to_heads], name=f"{p}.scores/heads")
        pr = g.op("Softmax", [g.op("Add", [s, "attn_mask"], name=f"{p}.mask")], name=f"{p}.softmax", axis=-1)
        if groups > 1:
            pr = g.op("Reshape", [pr, to_groups], name=f"{p}.probs/groups")
        o = g.op("MatMul", [pr, V], name=f"{p}.attend")
        if groups > 1:
            o = g.op("Reshape", [o, to_heads], name=f"{p}.attend/heads")
        o = g.op("Reshape", [g.op("Transpose", [o], name=f"{p}.merge/T", perm=[0, 2, 1, 3]), merged],
                 name=f"{p}.merge")                                               # [B, q, Hq*D]
        o = g.op("MatMul", [o, g.init(f"{p}.o_proj.weight", w(a.o_proj.weight).T)], name=f"{p}.o_proj")
        if a.o_proj.bias is not None:
            o = g.op("Add", [o, g.init(f"{p}.o_proj.bias", w(a.o_proj.bias))], name=f"{p}.o_proj/bias")
        x = g.op("Add", [x, o], name=f"{p}.residual_attn")
        h = rms(x, layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm")
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
        if mlp.down_proj.bias is not None:
            d = g.op("Add", [d, g.init(f"{p}.down_proj.bias", w(mlp.down_proj.bias))], name=f"{p}.down_proj/bias")
        x = g.op("Add", [x, d], name=f"{p}.residual_mlp")
    h = rms(x, m.norm.weight, "norm")
    head = model.get_output_embeddings()
    g.op("MatMul", [h, g.init("lm_head.weight", w(head.weight).T)], name="lm_head", out="logits")
    graph = helper.make_graph(g.nodes, f"{lm.family}_forward", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="dgopt.direct")
    proto.ir_version = 10
    return proto
