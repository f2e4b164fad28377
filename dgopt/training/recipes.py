"""The recipe table of dgopt's own small code models: everything needed to (re)build each one deterministically.

dgopt cannot download models, so it trains its own: small Llama-architecture causal LMs over the Python standard
library (see :mod:`dgopt.models.corpus`) with byte-level BPE tokenizers (shipped in ``dgopt/assets/tokenizers``,
see :mod:`dgopt.models.tokenizers_train`).

======================  ===========  ===================================================
name                    tokenizer    role
======================  ===========  ===================================================
``code-tiny``           code-bpe-4k  target model for CPU work (5.0 M params)
``code-draft``          code-bpe-4k  draft for code-tiny / code-small (0.61 M)
``code-draft-kd``       code-bpe-4k  code-draft distilled from code-tiny (0.61 M)
``code-draft-sd``       code-bpe-4k  code-draft-kd trained on code-tiny's greedy outputs
``code-draft-xtok``     code-bpe-1k  draft with a *different* tokenizer (0.32 M)
``code-draft-xtok-sd``  code-bpe-1k  code-draft-xtok trained on code-tiny's outputs
``code-small``          code-bpe-4k  larger target for a GPU (29.4 M params)
======================  ===========  ===================================================

Build with ``dgopt models build NAME`` (:mod:`dgopt.training.build` does the work).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..models import tokenizers_train as _tok


@dataclass(frozen=True)
class Recipe:
    """Everything needed to (re)build one model deterministically."""

    name: str
    description: str
    tokenizer: str
    # architecture (LlamaForCausalLM, tied embeddings)
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # data
    corpus: str = "stdlib"
    seq_len: int = 256
    batch_size: int = 16
    # every `long_every`-th step uses windows of `long_seq_len` tokens (same
    # number of tokens per batch) so the model also sees positions up to 1024
    long_seq_len: int = 1024
    long_every: int = 4
    # optimisation
    steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # evaluation / early stopping
    eval_every: int = 100
    eval_tokens: int = 32768  # tokens of the fixed periodic-eval subset
    patience: int = 0  # evals without improvement before stopping; 0 = never
    # wall-clock budget of the whole build (tokenizer, data, training, final
    # evaluation, saving).  When set, the LR schedule advances by whichever is
    # further along, steps or wall time, so a slower machine anneals and stops
    # early instead of overrunning; ``time_reserve_s`` is kept for the end.
    time_limit_s: float | None = None
    time_reserve_s: float = 45.0
    save_dtype: str = "float16"
    # distillation: a built model (name or dir) with the same tokenizer; the loss becomes KL(teacher || student)
    # per position, which trains for what speculative decoding needs (agreeing with the target), not for the data
    # (checkpoints are still selected by validation cross-entropy; build info's train losses are then KL values)
    teacher: str | None = None
    init_from: str | None = None  # start from this built model's weights (same architecture) instead of random
    # sequence-level distillation (needs `teacher`): this many of the teacher's own greedy continuations of random
    # corpus windows (GEN_PROMPT + GEN_NEW tokens each) are generated before training, and every
    # `generated_every`-th step trains on them (KL to the teacher as on corpus rows). A draft is run on the text its
    # target writes, not on the corpus: this is the data it has to agree on. Checkpoints are then selected by
    # agreement with the teacher on held-out generations (GEN_HELD_OUT of them), not by corpus cross-entropy.
    # A teacher with another tokenizer (a UAG draft's target) can only give its text: prompts and continuations are
    # carried across as text, the loss is cross-entropy on the re-encoded generations (and on corpus rows), and
    # checkpoints are selected by cross-entropy on held-out generations.
    teacher_generated: int = 0
    generated_every: int = 2
    # generated rows train with cross-entropy on the teacher's greedy tokens (its argmax: what greedy verification
    # accepts) instead of KL, which needs no teacher forward per step; always so across tokenizers
    hard_labels: bool = False
    # the models this one is used with (its drafts, or its targets): a build whose tokenizer has a built partner's
    # name and vocabulary but other ids is refused, since speculative decoding would pair them without an error
    pairs_with: tuple[str, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)

    def llama_config(self, vocab_size: int):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            rms_norm_eps=1e-5,
            initializer_range=0.02,
            use_cache=True,
        )

    def approx_params(self) -> int:
        vocab = _tok.TOKENIZERS[self.tokenizer].vocab_size
        h, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        kv = (self.num_kv_heads or self.num_heads) * (h // self.num_heads)
        per_layer = h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h
        return vocab * h + L * per_layer + h


RECIPES: dict[str, Recipe] = {
    "code-tiny": Recipe(
        name="code-tiny",
        pairs_with=("code-draft", "code-draft-kd", "code-draft-sd", "code-draft-xtok", "code-draft-xtok-sd"),
        description="target model for CPU work: Llama 6x256, byte-level BPE 4k, Python stdlib",
        tokenizer="code-bpe-4k",
        hidden_size=256,
        num_layers=6,
        num_heads=4,
        intermediate_size=512,
        batch_size=8,
        steps=3000,
        lr=2e-3,
        warmup_steps=100,
        eval_every=200,
        time_limit_s=39 * 60,
    ),
    "code-draft": Recipe(
        name="code-draft",
        pairs_with=("code-tiny", "code-small"),
        description="draft model sharing code-tiny's tokenizer: Llama 2x96, BPE 4k",
        tokenizer="code-bpe-4k",
        hidden_size=96,
        num_layers=2,
        num_heads=2,
        intermediate_size=256,
        steps=1800,
        lr=3e-3,
        warmup_steps=80,
        eval_every=200,
        time_limit_s=9.5 * 60,
    ),
    "code-draft-xtok": Recipe(
        name="code-draft-xtok",
        pairs_with=("code-tiny", "code-small"),
        description="draft model with a different tokenizer: Llama 2x96, BPE 1k",
        tokenizer="code-bpe-1k",
        hidden_size=96,
        num_layers=2,
        num_heads=2,
        intermediate_size=256,
        steps=2500,
        lr=3e-3,
        warmup_steps=80,
        eval_every=250,
        time_limit_s=9.5 * 60,
    ),
    "code-small": Recipe(
        name="code-small",
        pairs_with=("code-draft", "code-draft-kd", "code-draft-sd", "code-draft-xtok", "code-draft-xtok-sd"),
        description="larger target for a GPU: Llama 8x512, BPE 4k, stdlib + pinned deps sources",
        tokenizer="code-bpe-4k",
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        intermediate_size=1536,
        corpus="stdlib+deps",
        seq_len=1024,
        batch_size=32,
        long_every=0,
        steps=4000,
        lr=1e-3,
        warmup_steps=200,
        eval_every=250,
        eval_tokens=131072,
        patience=4,
    ),
}
# the distilled draft starts from code-draft's weights (init_from), so it must keep code-draft's shape: derived
RECIPES["code-draft-kd"] = dataclasses.replace(
    RECIPES["code-draft"], name="code-draft-kd",
    description="code-draft distilled from code-tiny (KL to the target per position): a draft that agrees more",
    steps=600, lr=1.5e-3, warmup_steps=20, eval_every=100, time_limit_s=13 * 60, teacher="code-tiny",
    init_from="code-draft")
# sequence-level distillation on top: every step trains on code-tiny's own greedy continuations, with their tokens
# (code-tiny's argmax) as labels
RECIPES["code-draft-sd"] = dataclasses.replace(
    RECIPES["code-draft-kd"], name="code-draft-sd",
    description="code-draft-kd trained further on code-tiny's own greedy outputs: agrees more where it is used",
    steps=2500, lr=1e-3, warmup_steps=20, eval_every=250, time_limit_s=30 * 60, init_from="code-draft-kd",
    teacher_generated=16384, generated_every=1, hard_labels=True)
# the UAG draft cannot see code-tiny's distribution (another vocabulary), only its text: cross-entropy on code-tiny's
# greedy continuations re-encoded with the 1k tokenizer, every step
RECIPES["code-draft-xtok-sd"] = dataclasses.replace(
    RECIPES["code-draft-xtok"], name="code-draft-xtok-sd",
    description="code-draft-xtok trained further on code-tiny's greedy outputs as text (its own tokenizer)",
    steps=2500, lr=1e-3, warmup_steps=20, eval_every=250, time_limit_s=25 * 60, teacher="code-tiny",
    init_from="code-draft-xtok", teacher_generated=16384, generated_every=1)


def recipe_dict(r: Recipe) -> dict:
    """The recipe as JSON-able fields (the model card's ``recipe``)."""
    d = dataclasses.asdict(r)
    d["betas"] = list(r.betas)
    return d
