"""Op registry: every IR op's inputs (with the value types they accept), outputs, typed attrs and verify rule.

Value types: tokens [B,q] int64, positions [B,q] int64, mask [B,1,q,past+q] additive float, kv (the model's cache),
logits_seq [B,q,V], logits [B,V], probs [B,V] (normalised), token [B] int64, uniform [B] in [0,1),
gumbel [B,V], seen [B,V] (1.0 where a token already occurred: for repetition penalty).
candidates [B,G,K] int64 (G guessed K-token continuations), count [B] int64.
probs_seq [B,K,V] (a draft's distributions for its K proposals), uniform_seq [B,K] in [0,1), trip_count [] int64 (how
many times a loop runs: a step's number of draft proposals when it varies per step), flag [] bool (a loop's
continue condition). hidden_seq [B,q,H] (a forward's last hidden states, after the final norm: the LM head's input),
hidden [B,H] (one position's).
Randomness is always an explicit value (uniform / gumbel), produced by an `input` or by an impure op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import IRError

__all__ = ["OpSchema", "Attr", "schema", "register", "OPS", "VALUE_TYPES"]

VALUE_TYPES = ("tokens", "positions", "mask", "kv", "logits_seq", "logits", "probs", "token", "uniform",
               "gumbel", "seen", "candidates", "count", "probs_seq", "uniform_seq", "trip_count",
               "flag", "hidden_seq", "hidden")
_SCORES = ("logits",)


@dataclass(frozen=True)
class Attr:
    type: type | tuple
    default: Any = None          # None with required=True: must be given
    required: bool = False
    check: Callable[[Any], str | None] | None = None   # returns a failure reason


@dataclass(frozen=True)
class OpSchema:
    name: str
    inputs: tuple[tuple[str, tuple[str, ...]], ...]        # (input name, accepted value types)
    outputs: tuple[str, ...]
    output_types: tuple[str, ...] | None = None             # None: computed by type_fn
    attrs: dict[str, Attr] = field(default_factory=dict)
    impure: bool = False
    doc: str = ""
    type_fn: Callable | None = None                        # (node) -> tuple of output types
    min_inputs: int | None = None                          # inputs after the first min_inputs may be left out

    def fill_attrs(self, attrs: dict, node_id: str) -> dict:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"node '{node_id}' ({self.name}): unknown attribute(s) {sorted(unknown)}; "
                          f"allowed: {sorted(self.attrs) or 'none'}")
        out = {}
        for k, a in self.attrs.items():
            if k in attrs:
                v = attrs[k]
                if a.type is float and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)
                if not isinstance(v, a.type) or (isinstance(v, bool) and a.type in (int, float)):
                    raise IRError(f"node '{node_id}' ({self.name}): attribute '{k}' must be "
                                  f"{getattr(a.type, '__name__', a.type)}, got {v!r}")
                if a.check and (why := a.check(v)):
                    raise IRError(f"node '{node_id}' ({self.name}): attribute '{k}' {why}")
                out[k] = v
            elif a.required:
                raise IRError(f"node '{node_id}' ({self.name}): missing attribute '{k}'")
            else:
                out[k] = a.default
        return out

    def result_types(self, node, g=None) -> tuple[str, ...]:
        if self.name == "argmax":       # over [B,V] -> token [B]; over [B,q,V] -> tokens [B,q]
            return ("tokens",) if g is not None and _in_type(g, node, 0) == "logits_seq" else ("token",)
        if self.name == "as_seq":       # a distribution [B,V] -> [B,1,V]; a token [B] -> tokens [B,1]
            return ("tokens",) if g is not None and _in_type(g, node, 0) == "token" else ("probs_seq",)
        if self.name == "concat_seq":
            return (_in_type(g, node, 0),) if g is not None else ("tokens",)
        return self.type_fn(node) if self.type_fn else self.output_types


OPS: dict[str, OpSchema] = {}


def _in_type(g, node, i: int) -> str:
    ref = node.inputs[i]
    src = g.node(ref.node)
    sch = OPS[src.op]
    return sch.result_types(src, g)[sch.outputs.index(ref.output)]


def register(s: OpSchema) -> OpSchema:
    OPS[s.name] = s
    return s


def schema(op: str) -> OpSchema:
    try:
        return OPS[op]
    except KeyError:
        raise IRError(f"unknown op '{op}' (known: {', '.join(sorted(OPS))})") from None


def _pos(v):
    return None if v > 0 else "must be > 0"


def _unit_open(v):
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _unit(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _ge1(v):
    return None if v >= 1 else "must be >= 1"


def _vtype(v):
    return None if v in VALUE_TYPES else f"must be one of {VALUE_TYPES}"


def _proc(name: str, attrs: dict, doc: str, extra_inputs=()) -> OpSchema:
    return register(OpSchema(name, (("logits", _SCORES),) + tuple(extra_inputs), ("out",), ("logits",), attrs,
                             doc=doc))


register(OpSchema("input", (), ("out",), attrs={"name": Attr(str, required=True), "type": Attr(str, required=True,
                  check=_vtype)}, type_fn=lambda n: (n.attrs["type"],),
                  doc="A step input bound by name by the runtime."))
register(OpSchema("forward", (("input_ids", ("tokens",)), ("position_ids", ("positions",)), ("attn_mask", ("mask",)),
                              ("past", ("kv",))),
                  ("logits", "kv", "hidden"), ("logits_seq", "kv", "hidden_seq"), {"model": Attr(str, "target")},
                  doc="One model call over q new tokens with explicit positions and additive 4D mask. hidden: the "
                      "last hidden states after the final norm (the LM head's input; emitted only when used)."))
register(OpSchema("last_position", (("x", ("logits_seq",)),), ("out",), ("logits",),
                  doc="x[:, -1, :]: the scores that predict the next token."))
_proc("repetition_penalty", {"penalty": Attr(float, required=True, check=_pos)},
      "HF RepetitionPenaltyLogitsProcessor: seen scores s -> s/p if s > 0 else s*p.", (("seen", ("seen",)),))
_proc("temperature", {"value": Attr(float, required=True, check=_pos)}, "scores / T.")
_proc("top_k", {"k": Attr(int, required=True, check=_ge1)}, "Keep scores >= the k-th largest (ties kept).")
_proc("top_p", {"p": Attr(float, required=True, check=_unit_open)},
      "HF TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1-p; keep >= 1 token.")
_proc("min_p", {"p": Attr(float, required=True, check=_unit)},
      "HF MinPLogitsWarper: drop tokens with prob < p * max prob.")
register(OpSchema("softmax", (("logits", _SCORES),), ("out",), ("probs",), doc="softmax over the vocabulary."))
register(OpSchema("argmax", (("x", ("logits", "probs", "logits_seq")),), ("out",),
                  type_fn=lambda n: None, doc="First index of the maximum over the vocabulary (as torch.argmax)."))
register(OpSchema("multinomial", (("probs", ("probs",)), ("u", ("uniform",))), ("out",), ("token",),
                  doc="Inverse-CDF sample: the first index whose cumulative probability exceeds u * total."))
register(OpSchema("sample_top_k", (("logits", _SCORES), ("u", ("uniform",))), ("token", "probs"), ("token", "probs"),
                  {"k": Attr(int, required=True, check=_ge1), "temperature": Attr(float, 1.0, check=_pos)},
                  doc="A draft's proposal from its k largest scores alone: q = softmax(top-k values / T) scattered "
                      "over the vocabulary (exactly k kept: ties at the k-th are cut), token = inverse-CDF draw of "
                      "q in descending-score order. Any q is exact for a proposal verify_sample checks against it."))
register(OpSchema("random_uniform", (("like", ("logits", "probs")),), ("out",), ("uniform",),
                  {"seed": Attr(int, 0)}, impure=True, doc="In-graph U[0,1) per row (ONNX RandomUniformLike)."))
register(OpSchema("gumbel_argmax", (("logits", _SCORES), ("g", ("gumbel",))), ("out",), ("token",),
                  doc="argmax(logits + g), g ~ Gumbel(0,1) i.i.d.: a draw from softmax(logits) without a softmax."))
register(OpSchema("random_gumbel", (("like", ("logits",)),), ("out",), ("gumbel",), {"seed": Attr(int, 0)},
                  impure=True, doc="In-graph Gumbel(0,1) noise shaped like `like`: -log(-log(U)), U ~ U[0,1)."))


# Multi-token steps (lookahead, jacobi, speculative verification) --------------------------------------------------
_VERIFY_OUT = (("accept_len", "tokens", "best"), ("count", "tokens", "count"))
_NONNEG = Attr(int, required=True, check=lambda v: None if v >= 0 else "must be >= 0")
# G candidates of K tokens; K -1: one candidate whose length is the candidates' shape (it varies from step to step)
_GUESS_SHAPE = {"guesses": _NONNEG, "length": Attr(int, required=True, check=lambda v: None if v >= -1 else
                                                   "must be >= 0, or -1 (from the candidates' shape)")}
register(OpSchema("verify_greedy", (("logits", ("logits_seq",)), ("candidates", ("candidates",))),
                  *_VERIFY_OUT, _GUESS_SHAPE,
                  doc="Greedy verification. logits: [B, k + G*K, V] over an x-block of k tokens then G candidates of "
                      "K tokens. The argmax after the x-block is always accepted; candidate g then keeps its longest "
                      "prefix equal to the model's own argmax chain. Outputs: accept_len = 1 + best prefix [B], "
                      "tokens = the best candidate's argmax chain [B, K+1], best = its index [B] (first maximum). "
                      "length -1: one candidate, K its shape's last dim (a step's number of proposals varies)."))
_SEQS = ("tokens", "positions", "probs_seq")
register(OpSchema("concat_seq", (("a", _SEQS), ("b", _SEQS)), ("out",), type_fn=lambda n: None,
                  doc="Concatenate two token/position blocks (or two runs of distributions) along q."))
register(OpSchema("as_seq", (("x", ("probs", "token")),), ("out",), type_fn=lambda n: None,
                  doc="One distribution [B,V] as a run of one [B,1,V] (a draft's q for its first proposal), or one "
                      "token [B] as a block [B,1] (a chain's proposal)."))
register(OpSchema("to_target_vocab", (("x", ("logits",)),), ("out",), ("logits",),
                  doc="A draft's scores [B,Vd] over the target's vocabulary [B,V]: ids >= V dropped, ids the draft "
                      "lacks (Vd < V) at -inf. Its distribution then proposes only tokens the target can verify."))
register(OpSchema("next_inputs", (("token", ("token",)), ("positions", ("positions",)), ("mask", ("mask",))),
                  ("ids", "positions", "mask"), ("tokens", "positions", "mask"),
                  doc="The inputs of the one-token step that follows a block: ids = token[:, None], positions = the "
                      "block's last position + 1, mask = the block's last mask row plus a visible column for the new "
                      "token (it sees what the block's last token saw, and itself). Chains forwards inside one graph "
                      "(a draft proposing k tokens in one call)."))
register(OpSchema("repetition_penalty_seq", (("logits", ("logits_seq",)), ("seen", ("seen",)),
                                             ("candidates", ("candidates",))), ("out",), ("logits_seq",),
                  {"penalty": Attr(float, required=True, check=_pos)},
                  doc="The repetition penalty at every verified position, as generate applies it one token at a time: "
                      "logits [B, k + G*K, V] over an x-block and G candidates of K tokens; the last x position is "
                      "penalised by `seen` (the committed tokens), candidate g's position j by `seen` plus its tokens "
                      "0..j (the sequence it would continue). Earlier x positions, which no verifier reads, are left "
                      "as they are."))
register(OpSchema("mark_seen", (("seen", ("seen",)), ("token", ("token",))), ("out",), ("seen",),
                  doc="seen with each row's token marked (the repetition penalty's state one token later)."))
register(OpSchema("to_candidates", (("proposals", ("tokens",)),), ("ids", "candidates"), ("tokens", "candidates"),
                  doc="A draft's proposals [B,K] as the target's input: ids [B,K] (ids the target cannot embed, from a "
                      "larger draft vocabulary, become 0: such a proposal can never equal the target's argmax, so "
                      "verification stays exact) and the same tokens as one candidate [B,1,K] for verify_greedy."))
register(OpSchema("merge_masks", (("a", ("mask",)), ("b", ("mask",))), ("out",), ("mask",),
                  doc="Two [B,1,q_i,P+q_i] masks over the same past -> one [B,1,qa+qb,P+qa+qb] block mask in which "
                      "the two blocks see the shared past and themselves, never each other."))
register(OpSchema("split_seq", (("x", ("logits_seq",)), ("first", ("tokens",))), ("head", "tail"),
                  ("logits_seq", "logits_seq"), doc="Split along q after as many rows as `first` has tokens."))
register(OpSchema("split_kv", (("kv", ("kv",)), ("first", ("tokens",)), ("second", ("tokens",))), ("head", "tail"),
                  ("kv", "kv"), doc="A merged forward's cache P + qa + qb -> (P + qa) and (P + qb)."))
register(OpSchema("tail_positions", (("x", ("logits_seq",)),), ("out",), ("logits",),
                  {"length": Attr(int, required=True, check=lambda v: None if v >= 0 else "must be >= 0")},
                  doc="The last length+1 positions of x as rows [B*(length+1), V] (row b*(length+1)+i): the scores "
                      "that predict each of K candidate tokens and the bonus token, so that logits processors apply "
                      "to them unchanged."))
register(OpSchema("verify_sample", (("logits", ("logits",)), ("candidates", ("candidates",)),
                                    ("draft_probs", ("probs_seq",)), ("u", ("uniform_seq",))),
                  *_VERIFY_OUT,
                  {"length": Attr(int, required=True, check=lambda v: None if v >= 1 else "must be >= 1")},
                  doc="Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023). logits: the "
                      "target's processed scores [B*(K+1), V] (tail_positions), p = softmax; candidates [B,1,K] "
                      "drawn from draft_probs q [B,K,V]; u [B,K+1]. d_i is accepted iff u_i * q_i(d_i) < p_i(d_i), "
                      "i.e. with probability min(1, p/q); at the first rejection n the token is drawn from "
                      "norm(max(0, p_n - q_n)), after K acceptances from p_K, both by inverse CDF with u_K (a "
                      "column no acceptance test reads). The output is distributed exactly as sampling from p token "
                      "by token. Outputs as verify_greedy."))
register(OpSchema("verify_sample_match", (("probs", ("probs",)), ("candidates", ("candidates",)),
                                          ("u", ("uniform_seq",))),
                  *_VERIFY_OUT, _GUESS_SHAPE,
                  doc="Sampled verification of guesses that come without a distribution (lookahead's n-grams, "
                      "jacobi's block, uag's re-tokenized draft). probs: the target's distributions [B*(1+G*K), V] "
                      "(softmax of tail_positions + processors) after the x-block's last position and after each "
                      "of G candidates' K tokens. The token at depth d (0: after the x-block, d: after a guess's "
                      "d-th token) is drawn by inverse CDF with u [B, K+1] at column d: every guess uses the same "
                      "u_d, so guesses that agree so far draw the same token, and a guess is kept while it equals "
                      "the draws. Each committed token is a draw from p given the tokens before it, as sampling "
                      "token by token (for one guess it is rejection sampling with a point-mass draft). Outputs as "
                      "verify_greedy."))
register(OpSchema("draft_loop", (("input_ids", ("tokens",)), ("position_ids", ("positions",)), ("attn_mask", ("mask",)),
                                 ("past", ("kv",)), ("k", ("trip_count",)), ("seen", ("seen",))),
                  ("proposals", "kv"), ("tokens", "kv"),
                  {"model": Attr(str, "draft"), "k_max": Attr(int, required=True, check=_ge1),
                   "penalty": Attr(float, 1.0, check=_pos), "confidence": Attr(float, 0.0, check=_unit)},
                  min_inputs=5,
                  doc="A draft's greedy chain of k proposals, k a step input (at most k_max): k forwards of `model`, "
                      "the first over the given block, each later one over the token the one before chose, in ONE "
                      "loop (ONNX Loop; what an unrolled chain of forward, last_position, to_target_vocab, argmax "
                      "and next_inputs nodes computes for a fixed k). With `seen` (penalty != 1) each choice is "
                      "made under the repetition penalty of the committed tokens and the chain's own earlier ones. "
                      "proposals [B, k]: in the target's vocabulary for model \"draft\" (a fused step), in its own for "
                      "\"target\" (a draft compiled as its own step); kv: the cache after the block and d_1..d_{k-1}. "
                      "confidence > 0: the chain also ends after a proposal to which any row's draft gives less "
                      "than this probability (k is then at most the trip count; read it off proposals' shape)."))
register(OpSchema("confident", (("x", ("logits",)),), ("out",), ("flag",),
                  {"threshold": Attr(float, required=True, check=_unit)},
                  doc="Whether every row's top softmax probability of x is at least threshold: a draft_loop's "
                      "continue condition (transformers' assistant_confidence_threshold; in a batch one unsure row "
                      "ends the chain)."))
register(OpSchema("trim_block", (("positions", ("positions",)), ("mask", ("mask",)), ("ids", ("tokens",))),
                  ("positions", "mask"), ("positions", "mask"),
                  doc="A block's positions [B, q] and mask [B, 1, q, P + q], built for q tokens, cut to the q' <= q "
                      "tokens that ids [B, q'] has (its first q' rows and the past's and block's first q' columns): "
                      "the verify block of a draft chain that stopped early."))


# RecycleGPT / EAGLE: the recyclable module's chain over the target's hidden states ----------------------------------
register(OpSchema("accepted_hidden", (("hidden", ("hidden_seq",)), ("accept_len", ("count",)),
                                      ("tokens", ("tokens",))), ("hidden", "token"), ("hidden", "token"),
                  {"length": Attr(int, -1)},
                  doc="Where the module's chain starts after verification. hidden: the verify forward's hidden states "
                      "[B, T, H] whose last K+1 rows are the x-block's last position and K candidates; accept_len "
                      "[B] and tokens [B, K+1] as verify_greedy gives them. Outputs the hidden state of the row's "
                      "last accepted position (the one that predicted the bonus token: T-K-2+accept_len) and the "
                      "bonus token tokens[accept_len-1]. length: K (-1: read from tokens' width)."))
register(OpSchema("accept_unverified", (("tokens", ("tokens",)), ("accept_len", ("count",)),
                                        ("candidates", ("candidates",)), ("trusted", ("count",))),
                  *_VERIFY_OUT,
                  doc="RecycleGPT's LOSSY mode (strategy recycle, verify: false): the first `trusted` [B] proposals of "
                      "candidates [B, 1, K] are committed unverified. tokens [B, K+1] and accept_len [B] as "
                      "verify_greedy gives them (the target's argmax chain); out: tokens with d_1..d_trusted in front "
                      "(then the target's own tokens), accept_len max(accept_len, trusted + 1). trusted 0 is plain "
                      "verification (the prefill's guesses from the prompt), K commits the module's whole chain and "
                      "the target's token after it: K + 1 tokens per target forward, not the target's output."))
register(OpSchema("recycle_chain", (("hidden", ("hidden",)), ("token", ("token",))), ("proposals",), ("tokens",),
                  {"module": Attr(str, "recycle"), "length": Attr(int, required=True, check=_ge1)},
                  doc="The recyclable module's greedy chain in one node (pass fuse_recycle_chain): `length` "
                      "recycle_step nodes, each reading the hidden state the one before predicted and the argmax "
                      "of its scores, from hidden [B, H] and token [B] -> the chosen tokens [B, length]."))
register(OpSchema("next_chain_length", (("accept_len", ("count",)), ("candidates", ("candidates",)),
                                        ("cap", ("trip_count",)), ("active", ("count",))), ("k",), ("trip_count",), {},
                  doc="transformers' assisted-generation schedule, in the step: K + 2 if every active row (active "
                      "[B]: 1, 0 for a finished row) accepted all K candidates (accept_len K + 1), else K - 1, within "
                      "1..cap; K is the candidates' length "
                      "[B, 1, K]. The chain the step runs next is verified by the next step, which so sees its "
                      "own acceptance's answer."))
register(OpSchema("recycle_loop", (("hidden", ("hidden",)), ("token", ("token",)), ("k", ("trip_count",))),
                  ("proposals",), ("tokens",), {"module": Attr(str, "recycle")},
                  doc="The recyclable module's greedy chain as a loop of k steps, k a value of the step (strategy "
                      "recycle with k_schedule heuristic: next_chain_length's): from hidden [B, H] and token [B] -> "
                      "the chosen tokens [B, k], each step reading the hidden state the one before predicted and its "
                      "argmax."))
register(OpSchema("recycle_step", (("hidden", ("hidden",)), ("token", ("token",))), ("hidden", "logits"),
                  ("hidden", "logits"), {"module": Attr(str, "recycle")},
                  doc="One step of the recyclable module (dgopt/models/recycle.py): the target's post-norm hidden "
                      "state at t and token t+1 -> the predicted post-norm hidden state at t+1 and, through the "
                      "target's frozen final norm and LM head, the scores for token t+2."))
