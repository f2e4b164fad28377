"""multinomial(softmax(x), u) -> gumbel_argmax(x, g), g = -log(-log U) over the vocabulary (Gumbel-max trick).

Exact in distribution, not per seed: P(argmax_i x_i + g_i = k) = softmax(x)_k for i.i.d. Gumbel(0,1) g. Processors
that remove tokens (top-k, top-p, min-p) set them to -inf, so -inf + g never wins: the noise acts over the kept
tokens only. No softmax and no cumulative sum remain on the critical path, and the noise does not depend on the
logits, so the runtime draws it ahead of time (`precomputed`, a [B, V] input) or the graph draws it (`in_graph`).
Skipped where the softmax has other users (a speculative draft's q feeds verification): the softmax stays anyway,
and [B, V] noise would replace a [B] uniform for nothing."""
from dgopt.passmgr import Pass


class FuseGumbelSampling(Pass):
    name = "fuse_gumbel_sampling"

    def call(self, g) -> bool:
        modified = False
        for m in g.find("multinomial"):
            sm = g.node(m.inputs[0].node)
            # another reader of the softmax (besides a random_uniform that only takes its shape) keeps it alive
            others = [n for n in g.users(m.inputs[0]) if n.id not in (m.id, m.inputs[1].node)]
            if sm.op != "softmax" or others or g.is_output(m.inputs[0]):
                continue
            u = g.node(m.inputs[1].node)
            prefix = m.id.rsplit("/", 1)[0] + "/" if "/" in m.id else ""
            if u.op == "random_uniform":
                noise = g.add("random_gumbel", [sm.inputs[0]], {"seed": u.attrs["seed"]}, id=f"{prefix}random_gumbel")
            else:
                noise = g.add("input", attrs={"name": g.fresh_id("gumbel"), "type": "gumbel"}, id="gumbel")
            self.stamp(noise)
            fused = g.add("gumbel_argmax", [sm.inputs[0], noise], id=f"{prefix}gumbel_argmax")
            self.stamp(fused, rewrote="multinomial(softmax(x), u) -> argmax(x + gumbel)")
            g.replace_all_uses(m.out(), fused.out())
            g.remove(m.id)
            if u.op == "random_uniform" and not g.users(u.id):   # impure: dead-node elimination would keep it
                g.remove(u.id)
            modified = True
        return modified
