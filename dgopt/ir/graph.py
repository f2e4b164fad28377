"""The IR graph: nodes with typed ops over a networkx.MultiDiGraph; its methods are the only mutation API."""
from __future__ import annotations

import copy as _copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import networkx as nx

from ..errors import IRError

__all__ = ["ValueRef", "Node", "Graph"]


class ValueRef(NamedTuple):
    """One output of one node. Printed as ``node`` (first output) or ``node.output``."""
    node: str
    output: str

    def __str__(self) -> str:
        return f"{self.node}.{self.output}"


@dataclass
class Node:
    id: str
    op: str
    inputs: tuple[ValueRef, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)   # provenance ("created_by") and analysis results

    def out(self, name: str | None = None) -> ValueRef:
        from .ops import schema
        outs = schema(self.op).outputs
        name = name or outs[0]
        if name not in outs:
            raise IRError(f"node '{self.id}' ({self.op}) has no output '{name}' (has {', '.join(outs)})")
        return ValueRef(self.id, name)


class Graph:
    def __init__(self) -> None:
        self._g = nx.MultiDiGraph()
        self.outputs: dict[str, ValueRef] = {}

    # -- reading
    def node(self, node_id: str) -> Node:
        try:
            return self._g.nodes[node_id]["node"]
        except KeyError:
            raise IRError(f"no node '{node_id}'") from None

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._g

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def nodes(self) -> Iterator[Node]:
        return (self._g.nodes[n]["node"] for n in self._g.nodes)

    def ops(self) -> list[str]:
        return [n.op for n in self.topo_order()]

    def find(self, op: str) -> list[Node]:
        return [n for n in self.topo_order() if n.op == op]

    def users(self, ref: ValueRef | str) -> list[Node]:
        """Nodes that read `ref` (a ValueRef) or any output of node `ref` (a str)."""
        node_id = ref if isinstance(ref, str) else ref.node
        out = []
        for _, v, data in self._g.out_edges(node_id, data=True):
            if isinstance(ref, str) or data["output"] == ref.output:
                n = self.node(v)
                if n not in out:
                    out.append(n)
        return out

    def is_output(self, ref: ValueRef) -> bool:
        return ref in self.outputs.values()

    def topo_order(self) -> list[Node]:
        try:
            order = list(nx.lexicographical_topological_sort(self._g, key=self._insertion_key))
        except nx.NetworkXUnfeasible:
            raise IRError("graph has a cycle") from None
        return [self.node(n) for n in order]

    def _insertion_key(self, node_id: str):
        return self._g.nodes[node_id]["seq"]

    # -- mutation
    def fresh_id(self, base: str) -> str:
        if base not in self._g:
            return base
        i = 1
        while f"{base}_{i}" in self._g:
            i += 1
        return f"{base}_{i}"

    def add(self, op: str, inputs=(), attrs: dict | None = None, id: str | None = None,
            meta: dict | None = None) -> Node:
        from .ops import schema
        sch = schema(op)
        node_id = self.fresh_id(id or op)
        refs = tuple(self._as_ref(r) for r in inputs)
        node = Node(node_id, op, refs, sch.fill_attrs(attrs or {}, node_id), dict(meta or {}))
        self._g.add_node(node_id, node=node, seq=self._next_seq())
        for i, r in enumerate(refs):
            if r.node not in self._g:
                self._g.remove_node(node_id)
                raise IRError(f"node '{node_id}' input {i} refers to unknown node '{r.node}'")
            self._g.add_edge(r.node, node_id, key=i, output=r.output)
        return node

    def _next_seq(self) -> int:
        self._seq = getattr(self, "_seq", 0) + 1
        return self._seq

    def _as_ref(self, r) -> ValueRef:
        if isinstance(r, ValueRef):
            return r
        if isinstance(r, Node):
            return r.out()
        if isinstance(r, str):
            return self.parse_ref(r)
        raise IRError(f"not a value reference: {r!r}")

    def parse_ref(self, text: str) -> ValueRef:
        node_id, _, out = text.partition(".")
        if node_id not in self._g:
            raise IRError(f"reference '{text}' names unknown node '{node_id}'")
        return self.node(node_id).out(out or None)

    def set_output(self, name: str, ref) -> None:
        self.outputs[name] = self._as_ref(ref)

    def set_input(self, node_id: str, index: int, ref) -> None:
        node = self.node(node_id)
        new = self._as_ref(ref)
        old = node.inputs[index]
        node.inputs = node.inputs[:index] + (new,) + node.inputs[index + 1:]
        self._g.remove_edge(old.node, node_id, key=index)
        self._g.add_edge(new.node, node_id, key=index, output=new.output)

    def replace_all_uses(self, old: ValueRef, new) -> int:
        new = self._as_ref(new)
        count = 0
        for user in self.users(old):
            for i, r in enumerate(user.inputs):
                if r == old:
                    self.set_input(user.id, i, new)
                    count += 1
        for name, r in list(self.outputs.items()):
            if r == old:
                self.outputs[name] = new
                count += 1
        return count

    def remove(self, node_id: str) -> None:
        if self.users(node_id) or any(r.node == node_id for r in self.outputs.values()):
            raise IRError(f"cannot remove node '{node_id}': it still has uses")
        self._g.remove_node(node_id)

    def copy(self) -> "Graph":
        g = Graph()
        g._g = self._g.copy()
        for n in g._g.nodes:
            g._g.nodes[n]["node"] = _copy.deepcopy(self._g.nodes[n]["node"])
        g.outputs = dict(self.outputs)
        g._seq = getattr(self, "_seq", 0)
        return g

    def fingerprint(self) -> str:
        """Hash of structure + attrs (not meta): equal graphs print the same."""
        body = [[n.id, n.op, [str(r) for r in n.inputs], n.attrs] for n in self.topo_order()]
        blob = json.dumps([body, {k: str(v) for k, v in sorted(self.outputs.items())}], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Graph({len(self)} nodes: {' → '.join(self.ops())})"
