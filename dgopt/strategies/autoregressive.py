"""Autoregressive decoding: one model call over the new tokens, then logits processors and a sampler, all in the
step graph. The -O0 expansion is the literal textbook step (processors -> softmax -> argmax|multinomial); passes
simplify it. The other strategies build on its step inputs, processors and sampler."""
from __future__ import annotations

from ..ir import Graph
from ..spec import Spec

__all__ = ["expand_autoregressive", "add_model_inputs", "add_processors", "add_sampler"]


def add_model_inputs(g: Graph):
    ids = g.add("input", attrs={"name": "input_ids", "type": "tokens"}, id="input_ids")
    pos = g.add("input", attrs={"name": "position_ids", "type": "positions"}, id="position_ids")
    mask = g.add("input", attrs={"name": "attn_mask", "type": "mask"}, id="attn_mask")
    past = g.add("input", attrs={"name": "past", "type": "kv"}, id="past")
    return ids, pos, mask, past


def add_processors(g: Graph, logits, sampling, prefix: str = "sampler") -> object:
    """Logits processors in Hugging Face's order (repetition penalty, temperature, top-k, top-p, min-p). Greedy
    applies only the repetition penalty, as `generate(do_sample=False)` does."""
    x = logits
    if sampling.repetition_penalty != 1.0:
        seen = g.add("input", attrs={"name": "seen", "type": "seen"}, id="seen")
        x = g.add("repetition_penalty", [x, seen], {"penalty": sampling.repetition_penalty},
                  id=f"{prefix}/repetition_penalty")
    if sampling.kind == "sample":
        if sampling.temperature != 1.0:
            x = g.add("temperature", [x], {"value": sampling.temperature}, id=f"{prefix}/temperature")
        if sampling.top_k:
            x = g.add("top_k", [x], {"k": sampling.top_k}, id=f"{prefix}/top_k")
        if sampling.top_p < 1.0:
            x = g.add("top_p", [x], {"p": sampling.top_p}, id=f"{prefix}/top_p")
        if sampling.min_p > 0.0:
            x = g.add("min_p", [x], {"p": sampling.min_p}, id=f"{prefix}/min_p")
    return x


def add_sampler(g: Graph, logits, sampling, prefix: str = "sampler") -> object:
    """The processors, then the sampler: argmax for greedy, else multinomial over the softmax."""
    x = add_processors(g, logits, sampling, prefix)
    probs = g.add("softmax", [x], id=f"{prefix}/softmax")
    if sampling.kind == "greedy":
        return g.add("argmax", [probs], id=f"{prefix}/argmax")
    if sampling.noise == "in_graph":
        u = g.add("random_uniform", [probs], {"seed": sampling.seed}, id=f"{prefix}/random_uniform")
    else:
        u = g.add("input", attrs={"name": "uniform", "type": "uniform"}, id="uniform")
    return g.add("multinomial", [probs, u], id=f"{prefix}/multinomial")


def expand_autoregressive(spec: Spec) -> Graph:
    g = Graph()
    ids, pos, mask, past = add_model_inputs(g)
    fwd = g.add("forward", [ids, pos, mask, past], {"model": "target"}, id="target")
    last = g.add("last_position", [fwd.out("logits")], id="last_position")
    tok = add_sampler(g, last, spec.sampling)
    g.set_output("next_token", tok)
    g.set_output("present", fwd.out("kv"))
    return g
