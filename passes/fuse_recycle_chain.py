"""k greedy recycle_step nodes (each reading the hidden state the one before predicted and the token its argmax
chose, the tokens collected by as_seq / concat_seq) -> one recycle_chain node.

Exact: the node computes the same steps in the same order. Its lowering (backends/onnx/recycle.py) may then keep
the chain in the module's own shapes, take the argmax over the draft vocabulary's scores rather than over the
scattered [B, V] row (the same first maximum: every other entry of that row sits at the float minimum and the
vocabulary is ascending) and collect the proposals once: a chain step of the shipped module is 14 onnxruntime
kernels instead of 17 (on 2 CPU cores a small kernel costs a few us whatever it computes). Runs after
eliminate_softmax_before_argmax (the -O0 chain's softmaxes hide the pattern); the replaced nodes are left to
eliminate_dead_nodes."""
from dgopt.passmgr import Pass


def _users(g, ref):
    """Readers of ref that are read themselves (the softmaxes eliminate_softmax_before_argmax bypassed are not)."""
    return [u for u in g.users(ref) if g.users(u.id) or any(r.node == u.id for r in g.outputs.values())]


def _leaves(g, ref):
    """The tokens a concat_seq / as_seq tree collects, in order, and the nodes it is made of (None if another
    node reads an inner value)."""
    n = g.node(ref.node)
    if n.op == "as_seq":
        return [n.inputs[0]], [n]
    if n.op != "concat_seq":
        return None
    a, b = n.inputs
    if len(_users(g, a)) != 1 or g.is_output(a) or g.node(b.node).op != "as_seq" or len(_users(g, b)) != 1:
        return None
    inner = _leaves(g, a)
    if inner is None:
        return None
    return inner[0] + [g.node(b.node).inputs[0]], inner[1] + [n, g.node(b.node)]


class FuseRecycleChain(Pass):
    name = "fuse_recycle_chain"

    def call(self, g) -> bool:
        modified = False
        for top in [n for n in g.topo_order() if n.op in ("concat_seq", "as_seq")]:
            if top.id not in g or any(u.op == "concat_seq" for u in g.users(top.out())):
                continue        # not the top of a collection
            found = _leaves(g, top.out())
            if found is None:
                continue
            toks, steps = found[0], []
            for i, t in enumerate(toks):
                am = g.node(t.node)
                st = g.node(am.inputs[0].node) if am.op == "argmax" else None
                if st is None or st.op != "recycle_step" or am.inputs[0] != st.out("logits") \
                        or len(_users(g, st.out("logits"))) != 1 or g.is_output(st.out("logits")):
                    break
                if steps:   # reads the step before: its hidden state and its token, and nothing else reads them
                    prev = steps[-1]
                    if st.inputs != (prev.out("hidden"), toks[i - 1]) or len(_users(g, prev.out("hidden"))) != 1 \
                            or st.attrs != prev.attrs or {u.id for u in _users(g, toks[i - 1])} != \
                            {st.id, found[1][2 * (i - 1)].id}:
                        break
                steps.append(st)
            if len(steps) != len(toks) or len(toks) < 1:
                continue
            first = steps[0]
            chain = g.add("recycle_chain", list(first.inputs), {"module": first.attrs["module"],
                                                               "length": len(steps)},
                          id=first.id.rsplit("/", 1)[0] + "/chain" if "/" in first.id else "recycle/chain")
            self.stamp(chain, rewrote=f"{len(steps)} x (recycle_step -> argmax) -> recycle_chain")
            g.replace_all_uses(top.out(), chain.out("proposals"))
            modified = True
        return modified
