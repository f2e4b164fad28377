"""The decoding IR: Graph, op registry, verifier, printer."""
from .graph import Graph, Node, ValueRef
from .ops import OPS, schema
from .printer import graph_from_dict, graph_to_dict, spec_with_graph
from .verify import verify

__all__ = ["Graph", "Node", "ValueRef", "OPS", "schema", "verify", "graph_to_dict", "graph_from_dict",
           "spec_with_graph"]
