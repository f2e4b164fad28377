"""The lowering's builder: walks the IR step graph in topological order, asks the rule for each node's op (the
`rules` table, lower.py) to emit ONNX nodes, and names the step's inputs and outputs for the manifest. Node names read
as `<ir node id>/<OnnxOp>`; every node carries its IR op, IR node and the pass that made it in doc_string and
metadata_props, so Netron shows where it came from. Shared helpers of the rule modules live here too."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dgopt.errors import BackendError
from dgopt.ir import Graph
from dgopt.ir.verify import value_type

__all__ = ["Builder", "OPSET", "F32", "I64", "F16", "INT_MAX", "kv_et", "dtname", "dim", "used"]

OPSET = 18
F32, I64, F16 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT16
INT_MAX = np.iinfo(np.int64).max


def kv_et(info: dict) -> int:
    return F16 if info.get("kv_dtype") == "float16" else F32


class Builder:
    def __init__(self, g: Graph, forwards: dict, vocab_size: int | None, rules: dict):
        self.g = g
        self.rules = rules                  # IR op -> rule(builder, node, input names)
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
            fn = self.rules.get(node.op)
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
                        name, kv_et(info), ["batch", info["num_kv_heads"], f"{oname}_len", info["head_dim"]]))
                self.io["outputs"].append({"name": oname, "type": "kv", "tensors": [
                    f"{oname}.{i}.{kv}" for i in range(info["num_layers"]) for kv in ("key", "value")]})
            else:
                self._name_output(self.names[ref], oname)
                et, shape = self.dims(vt)
                shape = [f"{oname}_{d}" if d in ("q", "total") else d for d in shape]
                if oname == "accept_tokens":
                    shape = ["batch", "length_plus_one"]
                self.outputs.append(helper.make_tensor_value_info(oname, et, shape))
                self.io["outputs"].append({"name": oname, "type": vt, "dtype": dtname(et), "shape": shape})
        graph = helper.make_graph(self.nodes, "dgopt_step", self.inputs, self.outputs, list(self.inits.values()))
        # a forward written with onnxruntime's contrib ops (direct.py, contrib=True) brings their domain along
        domains = sorted(op_domains(self.nodes) - {"", "ai.onnx"})
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


def op_domains(nodes) -> set[str]:
    """Op domains of nodes and of their subgraphs (a draft_loop's body)."""
    out = set()
    for nd in nodes:
        out.add(nd.domain)
        for a in nd.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out |= op_domains(a.g.node)
    return out


def dtname(et: int) -> str:
    return {F32: "float32", I64: "int64", TensorProto.BOOL: "bool"}[et]   # bool: a flag (tests lower one alone)


def dim(b, x: str, axis: int) -> str:
    """Shape(x)[axis] as a 1-element int64 tensor."""
    return b.op("Shape", [x], start=axis, end=axis + 1)


def used(b, node, out: str) -> bool:
    ref = node.out(out)
    return bool(b.g.users(ref)) or b.g.is_output(ref)
