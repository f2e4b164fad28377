"""A sampled draft's multinomial(softmax(top_k([temperature](x)))) -> sample_top_k(x): the proposal and its q from
the k largest scores alone ([B, k] softmax and inverse CDF, one scatter for q) instead of five [B, V] passes.

Exact in distribution, not per seed, and only where q is a draft's (every other reader of the softmax is an `as_seq`
whose run reaches only verify_sample's q, or the output `proposal_probs`: recycle's chain hands q to the next step,
whose verify_sample reads it as draft_probs): rejection sampling keeps d ~ q with probability min(1, p/q)
and otherwise draws from norm(max(0, p - q)), which gives the target's p for *any* q the proposal was drawn from.
So the two ways sample_top_k's q may differ from the unfused one (ties at the k-th score: top_k keeps them all,
sample_top_k exactly k; the draw's order: descending scores instead of vocabulary order) change which tokens are
proposed per seed, never the output's distribution. A target's sampler is left alone (its q is the output's)."""
from dgopt.passmgr import Pass


FED_BACK_Q = "proposal_probs"     # a step output the runtime feeds to the next step's verify_sample as its q


def _only_reaches_verify_q(g, ref) -> bool:
    users = g.users(ref)
    fed_back = g.is_output(ref) and all(name == FED_BACK_Q for name, r in g.outputs.items() if r == ref)
    if (not users and not fed_back) or (g.is_output(ref) and not fed_back):
        return False
    for u in users:
        if u.op == "concat_seq":
            if not _only_reaches_verify_q(g, u.out()):
                return False
        elif not (u.op == "verify_sample" and [i for i, r in enumerate(u.inputs) if r == ref] == [2]):
            return False
    return True


class FuseDraftTopKSampling(Pass):
    name = "fuse_draft_top_k_sampling"

    def call(self, g) -> bool:
        modified = False
        for m in g.find("multinomial"):
            sm = g.node(m.inputs[0].node)
            if sm.op != "softmax" or g.node(sm.inputs[0].node).op != "top_k":
                continue
            others = [n for n in g.users(sm.out()) if n.id != m.id]
            if not others or g.is_output(sm.out()) or \
                    not all(n.op == "as_seq" and _only_reaches_verify_q(g, n.out()) for n in others):
                continue
            tk = g.node(sm.inputs[0].node)
            if len(g.users(tk.out())) != 1 or g.is_output(tk.out()):
                continue
            x, temp, dead = tk.inputs[0], 1.0, [m.id, sm.id, tk.id]
            src = g.node(x.node)
            if src.op == "temperature" and len(g.users(x)) == 1 and not g.is_output(x):
                x, temp = src.inputs[0], src.attrs["value"]
                dead.append(src.id)
            prefix = m.id.rsplit("/", 1)[0] + "/" if "/" in m.id else ""
            fused = g.add("sample_top_k", [x, m.inputs[1]], {"k": tk.attrs["k"], "temperature": temp},
                          id=f"{prefix}sample_top_k")
            self.stamp(fused, rewrote="multinomial(softmax(top_k(x / T))) -> sample_top_k(x) (a draft's q)")
            g.replace_all_uses(m.out(), fused.out("token"))
            g.replace_all_uses(sm.out(), fused.out("probs"))
            for nid in dead:
                g.remove(nid)
            modified = True
        return modified
