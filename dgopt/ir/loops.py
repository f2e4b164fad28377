"""The body of a `draft_loop`: one iteration of the draft's chain as an IR graph, which the ONNX lowering puts in a
Loop and the reference interpreter runs k times. It is what an unrolled chain repeats (strategies: add_draft_chain
with a greedy pick), so both lower through the same rules."""
from __future__ import annotations

from .graph import Graph, Node

__all__ = ["draft_loop_body", "LOOP_CARRIED"]

# the loop-carried values, in the order of the body's inputs and outputs (each output feeds the input of that name
# in the next iteration); the body's one scan output is "token"
LOOP_CARRIED = ("input_ids", "position_ids", "attn_mask", "past", "seen")


def draft_loop_body(node: Node) -> Graph:
    """Inputs (names prefixed by the loop node's id): input_ids, position_ids, attn_mask, past and, with a
    penalty, seen. A loop over model "target" (a draft compiled as its own step: uag) proposes in its own
    vocabulary; over "draft" (a fused step) in the target's. Outputs: the next iteration's input_ids, position_ids,
    attn_mask, past (the forward's cache), seen, token (this iteration's proposal [B]) and, with a confidence
    threshold, cond: whether to go on (a row's draft gave its proposal at least that probability)."""
    g, p = Graph(), f"{node.id}/"
    penalty = node.attrs.get("penalty", 1.0)
    types = {"input_ids": "tokens", "position_ids": "positions", "attn_mask": "mask", "past": "kv", "seen": "seen"}
    ins = {n: g.add("input", attrs={"name": p + n, "type": t}, id=p + n) for n, t in types.items()
           if n != "seen" or penalty != 1.0}
    fwd = g.add("forward", [ins["input_ids"], ins["position_ids"], ins["attn_mask"], ins["past"]],
                {"model": node.attrs.get("model", "draft")}, id=p + "forward")
    x = g.add("last_position", [fwd.out("logits")], id=p + "last_position")
    if node.attrs.get("model", "draft") != "target":     # a draft proposing for the target: its vocabulary
        x = g.add("to_target_vocab", [x], id=p + "to_target_vocab")
    if "seen" in ins:
        x = g.add("repetition_penalty", [x, ins["seen"]], {"penalty": penalty}, id=p + "repetition_penalty")
    tok = g.add("argmax", [x], id=p + "argmax")
    if node.attrs.get("confidence", 0.0) > 0:        # the probability of the argmax, under the scores it is taken of
        g.set_output("cond", g.add("confident", [x], {"threshold": node.attrs["confidence"]}, id=p + "confident"))
    nxt = g.add("next_inputs", [tok, ins["position_ids"], ins["attn_mask"]], id=p + "next")
    g.set_output("input_ids", nxt.out("ids"))
    g.set_output("position_ids", nxt.out("positions"))
    g.set_output("attn_mask", nxt.out("mask"))
    g.set_output("past", fwd.out("kv"))
    if "seen" in ins:
        g.set_output("seen", g.add("mark_seen", [ins["seen"], tok], id=p + "mark_seen"))
    g.set_output("token", tok)
    return g
