"""Two forwards of one model over the same past -> one forward over both token blocks with a block mask.

    forward(ids_a, pos_a, mask_a, past), forward(ids_b, pos_b, mask_b, past)
      -> forward(concat(ids_a, ids_b), concat(pos_a, pos_b), merge_masks(mask_a, mask_b), past)
         then split_seq (logits) and split_kv (cache) back into the two branches' values.

Exact up to float rounding: every token attends to exactly the keys it attended to before (the shared past and its
own block; the blocks never see each other) at the same positions, so each branch's logits and KV are the same
function of the same inputs. The step's inputs and outputs do not change, so the runtime is the same at -O0 and -O2.
Saves one model call (weights read once, one launch sequence) per step."""
from collections import defaultdict

from dgopt.passmgr import Pass


class MergeForwards(Pass):
    name = "merge_forwards"

    def call(self, g) -> bool:
        groups = defaultdict(list)
        for f in g.find("forward"):
            if g.users(f.out("hidden")) or g.is_output(f.out("hidden")):   # its hidden states are read (recycle):
                continue                                                   # split_seq does not split them
            groups[(f.attrs["model"], f.inputs[3])].append(f)
        modified = False
        for (model, past), fs in groups.items():
            while len(fs) >= 2:
                a, b = fs.pop(0), fs.pop(0)
                merged = self._merge(g, a, b, model, past)
                fs.insert(0, merged)
                modified = True
        return modified

    def _merge(self, g, a, b, model, past):
        base = f"merged/{model}"
        ids = g.add("concat_seq", [a.inputs[0], b.inputs[0]], id=f"{base}/ids")
        pos = g.add("concat_seq", [a.inputs[1], b.inputs[1]], id=f"{base}/position_ids")
        mask = g.add("merge_masks", [a.inputs[2], b.inputs[2]], id=f"{base}/mask")
        fwd = g.add("forward", [ids, pos, mask, past], {"model": model}, id=base)
        logits = g.add("split_seq", [fwd.out("logits"), a.inputs[0]], id=f"{base}/split_logits")
        kv = g.add("split_kv", [fwd.out("kv"), a.inputs[0], b.inputs[0]], id=f"{base}/split_kv")
        for n in (ids, pos, mask, fwd, logits, kv):
            self.stamp(n, merged=[a.id, b.id])
        g.replace_all_uses(a.out("logits"), logits.out("head"))
        g.replace_all_uses(b.out("logits"), logits.out("tail"))
        g.replace_all_uses(a.out("kv"), kv.out("head"))
        g.replace_all_uses(b.out("kv"), kv.out("tail"))
        g.remove(a.id)
        g.remove(b.id)
        return fwd
