"""argmax(softmax(x)) -> argmax(x). Exact: softmax is strictly monotone per row, so the first maximum is the same
index (ties stay ties because exp is injective on floats that differ; equal inputs give equal outputs)."""
from dgopt.passmgr import Pass


class EliminateSoftmaxBeforeArgmax(Pass):
    name = "eliminate_softmax_before_argmax"

    def call(self, g) -> bool:
        modified = False
        for am in g.find("argmax"):
            src = g.node(am.inputs[0].node)
            if src.op != "softmax":
                continue
            g.set_input(am.id, 0, src.inputs[0])
            self.stamp(am, rewrote="argmax(softmax(x)) -> argmax(x)")
            modified = True
        return modified
