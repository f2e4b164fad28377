"""IR <-> plain data (the `graph:` section of a spec). Printing then parsing gives the same fingerprint."""
from __future__ import annotations

from typing import Any

from ..errors import IRError
from .graph import Graph, ValueRef
from .ops import schema

__all__ = ["graph_to_dict", "graph_from_dict", "format_ref", "spec_with_graph"]


def format_ref(g: Graph, r: ValueRef) -> str:
    return r.node if r.output == schema(g.node(r.node).op).outputs[0] else str(r)


def graph_to_dict(g: Graph) -> dict[str, Any]:
    nodes = []
    for n in g.topo_order():
        d: dict[str, Any] = {"id": n.id, "op": n.op}
        if n.inputs:
            d["inputs"] = [format_ref(g, r) for r in n.inputs]
        attrs = {k: v for k, v in n.attrs.items() if v != schema(n.op).attrs[k].default or schema(n.op).attrs[k].required}
        if attrs:
            d["attrs"] = attrs
        if n.meta:
            d["meta"] = dict(n.meta)
        nodes.append(d)
    return {"nodes": nodes, "outputs": {k: format_ref(g, r) for k, r in g.outputs.items()}}


def graph_from_dict(data: Any) -> Graph:
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise IRError("graph: expected a mapping with a 'nodes' list and an 'outputs' mapping")
    g = Graph()
    for i, d in enumerate(data["nodes"]):
        if not isinstance(d, dict) or "op" not in d or "id" not in d:
            raise IRError(f"graph.nodes[{i}]: each node needs 'id' and 'op'")
        if d["id"] in g:
            raise IRError(f"graph.nodes[{i}]: duplicate node id '{d['id']}'")
        extra = set(d) - {"id", "op", "inputs", "attrs", "meta"}
        if extra:
            raise IRError(f"graph.nodes[{i}] ('{d['id']}'): unknown key(s) {sorted(extra)}")
        g.add(d["op"], [g.parse_ref(str(r)) for r in d.get("inputs", [])], d.get("attrs") or {}, id=str(d["id"]),
              meta=d.get("meta"))
    outs = data.get("outputs")
    if not isinstance(outs, dict) or not outs:
        raise IRError("graph.outputs: expected a non-empty mapping of output name -> node[.output]")
    for name, r in outs.items():
        g.set_output(str(name), g.parse_ref(str(r)))
    return g


def spec_with_graph(spec_dict: dict, g: Graph) -> dict:
    """A complete spec whose `graph:` section is g (what ir.yaml and `--dump-passes` write; it compiles again)."""
    d = {k: v for k, v in spec_dict.items() if k != "graph"}
    d["graph"] = graph_to_dict(g)
    return d
