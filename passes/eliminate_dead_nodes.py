"""Drop nodes that no graph output depends on. Impure nodes (randomness) are kept: removing one would change
which random numbers later draws see. Unused graph inputs go too: the runtime feeds exactly the inputs the
lowered step lists in the manifest, so a dead input would only cost a host-side fill per step."""
import networkx as nx

from dgopt.ir import schema
from dgopt.passmgr import Pass


class EliminateDeadNodes(Pass):
    name = "eliminate_dead_nodes"

    def call(self, g) -> bool:
        live = set()
        roots = {r.node for r in g.outputs.values()}
        roots |= {n.id for n in g.nodes() if schema(n.op).impure}
        for r in roots:
            live.add(r)
            live |= nx.ancestors(g._g, r)
        dead = [n for n in g.topo_order() if n.id not in live]
        for n in reversed(dead):
            g.remove(n.id)
        return bool(dead)
