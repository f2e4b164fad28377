"""Pass infrastructure in the onnx-ir style: a pass returns PassResult(graph, modified); a PassManager is itself a
pass, so pipelines nest; verification and dumps are instruments run between passes, never code inside them."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import DgoptError, PassError
from .ir import Graph, spec_with_graph, verify

__all__ = ["Pass", "PassResult", "PassManager", "VerifyInstrument", "DumpInstrument"]
log = logging.getLogger("dgopt.passes")


@dataclass
class PassResult:
    graph: Graph
    modified: bool


class Pass:
    """Subclasses set `name` (verb_object, the file name) and implement `call(graph) -> modified`.
    Passes work in place on the graph they are given; `__call__` copies first, so the caller's graph never changes."""
    name: str = ""

    def call(self, g: Graph) -> bool:
        raise NotImplementedError

    def __call__(self, g: Graph) -> PassResult:
        g = g.copy()
        modified = bool(self.call(g))
        return PassResult(g, modified)

    def stamp(self, node, **meta) -> None:
        """Provenance: which pass made or changed this node (torch.fx style node.meta)."""
        node.meta["created_by"] = self.name
        node.meta.update(meta)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class PassManager(Pass):
    name = "pipeline"

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Callable] = (), name: str = "pipeline"):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.name = name
        self.history: list[tuple[str, bool]] = []

    def __call__(self, g: Graph) -> PassResult:
        modified_any = False
        done: list[str] = []
        for inst in self.instruments:
            inst(0, "input", g, True)
        for i, p in enumerate(self.passes, 1):
            try:
                res = p(g)
            except DgoptError as e:
                raise PassError(f"pass '{p.name}' failed (after {', '.join(done) or 'no passes'}): {e}") from e
            except Exception as e:  # a bug in a pass: still name it
                raise PassError(f"pass '{p.name}' crashed (after {', '.join(done) or 'no passes'}): "
                                f"{type(e).__name__}: {e}") from e
            g = res.graph
            log.info("pass %s: %s", p.name, "modified" if res.modified else "no change")
            self.history.append((p.name, res.modified))
            done.append(p.name)
            modified_any |= res.modified
            for inst in self.instruments:
                inst(i, p.name, g, res.modified)
        return PassResult(g, modified_any)


class VerifyInstrument:
    """`--verify-each`: run the verifier after every pass; a failure names the pass that broke the graph."""

    def __call__(self, index: int, name: str, g: Graph, modified: bool) -> None:
        try:
            verify(g)
        except DgoptError as e:
            raise PassError(f"IR invalid after pass '{name}': {e}") from e


class DumpInstrument:
    """`--dump-passes DIR`: the IR after each pass that changed it, each file a complete, valid spec."""

    def __init__(self, directory: Path, spec_dict: dict):
        self.directory = Path(directory)
        self.spec_dict = spec_dict
        self.written: list[Path] = []

    def __call__(self, index: int, name: str, g: Graph, modified: bool) -> None:
        if not modified:
            return
        import yaml
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{index:02d}-{name}.yaml"
        path.write_text(yaml.safe_dump(spec_with_graph(self.spec_dict, g), sort_keys=False))
        self.written.append(path)
