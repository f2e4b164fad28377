"""Verification as data: named rules, each returning failure reasons. Run between passes (`--verify-each`)."""
from __future__ import annotations

from typing import Callable

from ..errors import IRError
from .graph import Graph
from .ops import OPS, schema

__all__ = ["verify", "RULES", "value_type"]


def value_type(g: Graph, ref) -> str:
    node = g.node(ref.node)
    sch = schema(node.op)
    return sch.result_types(node, g)[sch.outputs.index(ref.output)]


def _known_ops(g: Graph):
    for n in g.nodes():
        if n.op not in OPS:
            yield f"node '{n.id}': unknown op '{n.op}'"


def _arity_and_types(g: Graph):
    for n in g.nodes():
        if n.op not in OPS:
            continue
        sch = schema(n.op)
        least = len(sch.inputs) if sch.min_inputs is None else sch.min_inputs
        if not least <= len(n.inputs) <= len(sch.inputs):
            takes = len(sch.inputs) if least == len(sch.inputs) else f"{least} to {len(sch.inputs)}"
            yield f"node '{n.id}' ({n.op}): takes {takes} inputs, got {len(n.inputs)}"
            continue
        for (iname, accepted), ref in zip(sch.inputs, n.inputs):
            if ref.node not in g:
                yield f"node '{n.id}' input '{iname}': unknown node '{ref.node}'"
                continue
            src = g.node(ref.node)
            if ref.output not in schema(src.op).outputs:
                yield f"node '{n.id}' input '{iname}': node '{src.id}' has no output '{ref.output}'"
                continue
            t = value_type(g, ref)
            if t not in accepted:
                yield f"node '{n.id}' ({n.op}) input '{iname}': expects {'/'.join(accepted)}, got {t} from '{ref}'"


def _attrs(g: Graph):
    for n in g.nodes():
        if n.op not in OPS:
            continue
        try:
            schema(n.op).fill_attrs(n.attrs, n.id)
        except IRError as e:
            yield str(e)


def _acyclic(g: Graph):
    try:
        g.topo_order()
    except IRError as e:
        yield str(e)


def _outputs(g: Graph):
    if not g.outputs:
        yield "graph has no outputs"
    for name, ref in g.outputs.items():
        if ref.node not in g:
            yield f"output '{name}': unknown node '{ref.node}'"


def _unique_input_names(g: Graph):
    seen = {}
    for n in g.find("input"):
        if n.attrs["name"] in seen:
            yield f"input name '{n.attrs['name']}' used by nodes '{seen[n.attrs['name']]}' and '{n.id}'"
        seen[n.attrs["name"]] = n.id


def _one_guess_when_dynamic(g: Graph):
    """length -1 (K off the candidates' shape) is defined for one candidate only."""
    for n in g.nodes():
        if n.op in ("verify_greedy", "verify_sample_match") and n.attrs.get("length") == -1 \
                and n.attrs.get("guesses") != 1:
            yield f"node '{n.id}' ({n.op}): length -1 needs guesses 1, got {n.attrs.get('guesses')}"


RULES: dict[str, Callable[[Graph], object]] = {
    "known_ops": _known_ops,
    "arity_and_types": _arity_and_types,
    "attrs": _attrs,
    "acyclic": _acyclic,
    "outputs": _outputs,
    "unique_input_names": _unique_input_names,
    "one_guess_when_dynamic": _one_guess_when_dynamic,
}


def verify(g: Graph, where: str = "") -> None:
    problems = [p for rule in RULES.values() for p in rule(g)]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IRError(f"{where + ': ' if where else ''}invalid IR: {problems[0]}{more}")
