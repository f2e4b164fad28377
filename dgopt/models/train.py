"""Recipes and trainer for dgopt's own small code models.

dgopt cannot download models, so it trains its own: small Llama-architecture
causal LMs over the Python standard library (see :mod:`dgopt.models.corpus`)
with byte-level BPE tokenizers (see :mod:`dgopt.models.tokenizers_train`).

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

Build with ``python -m dgopt.models.train build NAME [--out DIR] [--steps N]
[--device cpu|cuda] [--seed S]``; list with ``python -m dgopt.models.train list``.

A built model directory holds ``config.json``, ``model.safetensors`` (float16
weights; ``config.json`` says ``"dtype": "float32"`` so a plain
``from_pretrained`` upcasts them to float32, the fast dtype on CPUs),
``generation_config.json``, the tokenizer files and ``dgopt_build.json``
(recipe, seed, steps, command, validation loss/perplexity, unigram baseline,
wall time, library versions).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import corpus as _corpus
from . import tokenizers_train as _tok

#: Where committed model assets live inside the package.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"

BUILD_INFO = "dgopt_build.json"
GEN_PROMPT, GEN_NEW, GEN_HELD_OUT = 16, 112, 128   # teacher-generated sequences: prompt and new tokens; held out


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


# --------------------------------------------------------------------------
# locations
# --------------------------------------------------------------------------


def cache_root() -> Path:
    """``$DGOPT_CACHE`` if set, else ``~/.cache/dgopt``."""
    env = os.environ.get("DGOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dgopt"


def cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def asset_dir(name: str) -> Path:
    return ASSETS_DIR / name


def _is_built(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def model_dir(name: str) -> Path:
    """Directory of built model ``name``: committed asset first, then user cache."""
    for d in (asset_dir(name), cache_dir(name)):
        if _is_built(d):
            return d
    known = "" if name in RECIPES else f" (unknown model; known: {', '.join(RECIPES)})"
    raise FileNotFoundError(
        f"model {name!r} is not built{known}; build it with: dgopt models build {name}"
        f"  (or: python -m dgopt.models.train build {name})"
    )


def list_models() -> list[dict]:
    rows = []
    for name, r in RECIPES.items():
        where, path, info = "missing", None, {}
        for kind, d in (("asset", asset_dir(name)), ("cache", cache_dir(name))):
            if _is_built(d):
                where, path = kind, d
                try:
                    info = json.loads((d / BUILD_INFO).read_text())
                except (OSError, ValueError):
                    info = {}
                break
        rows.append(
            {
                "name": name,
                "description": r.description,
                "tokenizer": r.tokenizer,
                "params": info.get("params", r.approx_params()),
                "where": where,
                "path": str(path) if path else None,
                "val_ppl": info.get("val_ppl"),
                "unigram_ppl": info.get("unigram_ppl"),
            }
        )
    return rows


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def encode_stream(tok, files: Sequence[_corpus.CorpusFile]):
    """One long int32 token tensor: each file's tokens followed by EOS (id 0)."""
    import torch

    eos = tok.eos_token_id
    texts = [_corpus.read_file(f) for f in files]
    enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    total = sum(len(e.ids) + 1 for e in enc)
    out = torch.empty(total, dtype=torch.int32)
    pos = 0
    for e in enc:
        n = len(e.ids)
        out[pos : pos + n] = torch.tensor(e.ids, dtype=torch.int32)
        out[pos + n] = eos
        pos += n + 1
    return out


def eval_windows(stream, seq_len: int, max_tokens: int | None = None):
    """Fixed, non-overlapping windows of ``seq_len`` covering the stream.

    With ``max_tokens`` an evenly spaced subset of them is kept.  Windows are
    returned as an (n, seq_len) int64 tensor; a shorter stream gives one window.
    """
    import torch

    seq_len = min(seq_len, len(stream))
    n = len(stream) // seq_len
    idx = list(range(n))
    if max_tokens is not None:
        keep = max(1, min(n, max_tokens // seq_len))
        idx = [round(i * (n - 1) / max(1, keep - 1)) for i in range(keep)] if keep > 1 else [0]
    return torch.stack([stream[i * seq_len : (i + 1) * seq_len] for i in idx]).long()


def unigram_ppl(train_stream, targets, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model (counts from train)."""
    import torch

    counts = torch.bincount(train_stream.long(), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    nll = -logp[targets.long().reshape(-1)].mean().item()
    return math.exp(nll)


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def _set_seeds(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_at(step: float, r: Recipe, total: int) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    t = (step - r.warmup_steps) / max(1, total - r.warmup_steps)
    t = min(1.0, t)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _evaluate(model, windows, device, batch_rows: int) -> float:
    """Mean next-token loss over all predicted positions of ``windows``."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_rows):
            x = windows[i : i + batch_rows].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += x[:, 1:].numel()
    model.train()
    return total / max(1, count)


def _resolve_built(ref: str) -> Path:
    """A built model's dir from a recipe name or a path."""
    p = Path(ref)
    return p if (p / "config.json").is_file() else model_dir(ref)


def _same_tokenizer(ref: str, tok) -> bool:
    """Whether built model `ref` was trained with `tok` (no record: assumed so, and checked by vocab size later)."""
    try:
        fp = json.loads((_resolve_built(ref) / BUILD_INFO).read_text()).get("tokenizer_fingerprint")
    except (OSError, ValueError):
        fp = None
    return fp is None or fp == _tok.tokenizer_fingerprint(tok)


def _load_built(ref: str, tok, role: str, device):
    """A built model (float32, eval) for `role` ('teacher' / 'init_from'), refusing another tokenizer."""
    from transformers import LlamaForCausalLM

    d = _resolve_built(ref)
    if not _same_tokenizer(ref, tok):
        raise ValueError(f"recipe.{role}: {ref} was trained with another tokenizer than this recipe's")
    m = LlamaForCausalLM.from_pretrained(str(d), dtype="float32").to(device)
    if m.config.vocab_size != len(tok):
        raise ValueError(f"recipe.{role}: {ref} has vocab {m.config.vocab_size}, this recipe's tokenizer {len(tok)}")
    return m


def _teacher_agreement(model, teacher, windows, device, batch_rows: int) -> float:
    """Fraction of positions where student and teacher argmax agree (what greedy speculative decoding accepts)."""
    import torch

    model.eval()
    same = count = 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_rows):
            x = windows[i : i + batch_rows].to(device)
            a = model(input_ids=x, use_cache=False).logits.argmax(-1)
            b = teacher(input_ids=x, use_cache=False).logits.argmax(-1)
            same += int((a == b).sum())
            count += a.numel()
    model.train()
    return same / max(1, count)


def _batch(step: int, recipe: Recipe, stream, generated, gen):
    """Step `step`'s training rows: teacher generations on every generated_every-th step (if any), else corpus
    windows (long ones on every long_every-th step); always about batch_size * seq_len tokens."""
    import torch

    if generated is not None and step % recipe.generated_every == 0:
        rows = max(1, (recipe.batch_size * recipe.seq_len) // generated.shape[1])
        return generated[torch.randint(0, len(generated), (rows,), generator=gen)]
    long = recipe.long_every and recipe.long_seq_len and (step % recipe.long_every == recipe.long_every - 1)
    L = min(recipe.long_seq_len if long else recipe.seq_len, len(stream) - 1)
    rows = max(1, (recipe.batch_size * recipe.seq_len) // L)
    starts = torch.randint(0, len(stream) - L, (rows,), generator=gen)
    return stream[starts[:, None] + torch.arange(L)[None, :]].long()


def _teacher_generations(teacher, stream, n: int, gen, device, bar, cross=None) -> "torch.Tensor":
    """[n, GEN_PROMPT + GEN_NEW] token ids: the teacher's greedy continuations of random corpus windows.
    cross = (student tokenizer, teacher tokenizer) for a teacher with another tokenizer: the window's text is
    encoded for the teacher (left-padded batch), and each row is the first GEN_PROMPT + GEN_NEW student tokens of
    the text prompt + continuation (rows that come out shorter are dropped and drawn again)."""
    import torch

    out, done, tried = [], 0, 0
    L = GEN_PROMPT + GEN_NEW
    while done < n:
        rows = min(64, n - done)
        starts = torch.randint(0, len(stream) - GEN_PROMPT, (rows,), generator=gen)
        x = stream[starts[:, None] + torch.arange(GEN_PROMPT)[None, :]].long()
        if cross is None:
            x = x.to(device)
            with torch.no_grad():
                y = teacher.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=GEN_NEW,
                                     min_new_tokens=GEN_NEW, do_sample=False, pad_token_id=0)
            y = y.cpu()
        else:
            stok, ttok = cross
            texts = stok.batch_decode(x.tolist())
            enc = [ttok(t, add_special_tokens=False)["input_ids"] or [0] for t in texts]
            width = max(len(e) for e in enc)
            ids = torch.tensor([[0] * (width - len(e)) + e for e in enc], device=device)
            am = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
            with torch.no_grad():
                y = teacher.generate(ids, attention_mask=am, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW,
                                     do_sample=False, pad_token_id=0)
            back = [stok(ttok.decode(row[width - len(e):].tolist()), add_special_tokens=False)["input_ids"]
                    for row, e in zip(y.cpu(), enc)]
            y = torch.tensor([b[:L] for b in back if len(b) >= L], dtype=torch.long).reshape(-1, L)
            tried += rows
            if tried > 4 * n:   # a tokenizer coarser than the teacher's: most rows come out short; don't spin
                raise ValueError(f"recipe.teacher_generated: only {done + len(y)} of {tried} continuations by the "
                                 f"teacher re-encode to {L} tokens of this recipe's tokenizer, whose tokens are "
                                 "longer than the teacher's")
        out.append(y)
        done += len(y)
        bar.update(done)
    return torch.cat(out)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class _Progress:
    """Rich progress bar (or plain prints when rich/terminal is unavailable)."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled = enabled
        self.bar = None
        self.plain = False
        if not enabled:
            return
        if not sys.stderr.isatty() and not sys.stdout.isatty():
            # no live bar in log files: print a plain line every few steps
            self.plain = True
            self.total, self.label, self.t0 = total, label, time.time()
            self.every = max(1, min(25, total // 20))
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(label, total=total, loss="-", val="-")

    def update(self, step: int, loss: float | None = None, val: float | None = None):
        if self.plain and loss is not None and (step % self.every == 0 or step == self.total):
            el = time.time() - self.t0
            print(
                f"{self.label} {step}/{self.total} loss {loss:.3f} "
                f"{el:.0f}s elapsed {el/max(1, step):.2f}s/step",
                flush=True,
            )
        if not self.bar:
            return
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.3f}"
        if val is not None:
            fields["val"] = f"{val:.3f}"
        self.bar.update(self.task, completed=step, **fields)

    def log(self, msg: str):
        if self.bar:
            self.bar.console.print(msg)
        elif self.enabled:
            print(msg, flush=True)

    def close(self):
        if self.bar:
            self.bar.stop()


def train_recipe(
    recipe: Recipe,
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    limit_bytes: int | None = None,
    vocab_size: int | None = None,
    command: str | None = None,
    threads: int | None = 2,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train ``recipe`` and save the best checkpoint (by validation loss) to ``out``.

    ``limit_bytes`` trains tokenizer and model on a deterministic slice of the
    corpus (tests, smoke runs); ``vocab_size`` overrides the tokenizer's vocab
    size.  Returns the build info that is also written to ``dgopt_build.json``
    (it additionally holds ``"losses"``, the per-step training losses).
    """
    import torch
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM

    t_start = time.time()
    say = log or (lambda m: None)
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    total_steps = int(steps if steps is not None else recipe.steps)
    out = Path(out)
    dev = torch.device(device)

    # ---- corpus and tokenizer -------------------------------------------
    train_files, val_files = _corpus.split_files(recipe.corpus, limit_bytes=limit_bytes)
    tok_spec = _tok.TOKENIZERS[recipe.tokenizer]
    if tok_spec.corpus == recipe.corpus:
        tok_files = train_files
    else:
        tok_files, _ = _corpus.split_files(tok_spec.corpus, limit_bytes=limit_bytes)
    tok = _tok.train_tokenizer(recipe.tokenizer, files=tok_files, vocab_size=vocab_size)
    vocab = len(tok)
    train_stream = encode_stream(tok, train_files)
    val_stream = encode_stream(tok, val_files)
    t_data = time.time() - t_start

    # ---- model ------------------------------------------------------------
    _set_seeds(seed)
    config = recipe.llama_config(vocab)
    model = LlamaForCausalLM(config).to(dev)
    if recipe.init_from:
        init = _load_built(recipe.init_from, tok, "init_from", dev)
        try:
            model.load_state_dict(init.state_dict())
        except RuntimeError as e:
            raise ValueError(f"recipe.init_from: {recipe.init_from} has another architecture: "
                             f"{str(e).splitlines()[0]}") from None
        del init
    teacher = cross = None
    if recipe.teacher and not _same_tokenizer(recipe.teacher, tok):
        if not recipe.teacher_generated:
            raise ValueError(f"recipe.teacher: {recipe.teacher} was trained with another tokenizer than this "
                             "recipe's; distil across tokenizers from its generated text (recipe.teacher_generated)")
        from transformers import AutoTokenizer
        tdir = _resolve_built(recipe.teacher)
        teacher = LlamaForCausalLM.from_pretrained(str(tdir), dtype="float32").to(dev).eval()
        cross = (tok, AutoTokenizer.from_pretrained(str(tdir)))
    elif recipe.teacher:
        teacher = _load_built(recipe.teacher, tok, "teacher", dev).eval()
    kl = teacher is not None and cross is None      # per-position KL needs the teacher's vocabulary
    loss_kind = ("cross_entropy" if not kl or (recipe.hard_labels and recipe.generated_every == 1) else
                 "kl_to_teacher" if not (recipe.hard_labels and recipe.teacher_generated) else
                 "kl_to_teacher+cross_entropy_on_generations")
    generated = held_out = None
    if recipe.teacher_generated:
        if teacher is None:
            raise ValueError("recipe.teacher_generated needs recipe.teacher (the model whose outputs are generated)")
        if recipe.generated_every < 1:
            raise ValueError(f"recipe.generated_every must be >= 1, got {recipe.generated_every}")
        n_gen, t_gen = recipe.teacher_generated + GEN_HELD_OUT, time.time()
        gbar = _Progress(progress, n_gen, f"{recipe.name}: teacher generations")
        gbar.log(f"{recipe.name}: {n_gen} greedy continuations by {recipe.teacher} ({GEN_NEW} tokens each, "
                 f"{GEN_HELD_OUT} held out)")
        try:
            all_gen = _teacher_generations(teacher, train_stream, n_gen, torch.Generator().manual_seed(seed + 1),
                                           dev, gbar, cross)
        finally:
            gbar.close()
        say(f"teacher_generations={n_gen} seconds={time.time() - t_gen:.0f}")
        generated, held_out = all_gen[GEN_HELD_OUT:], all_gen[:GEN_HELD_OUT]
    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    opt = torch.optim.AdamW(
        _param_groups(model, recipe.weight_decay),
        lr=recipe.lr,
        betas=recipe.betas,
        fused=dev.type == "cuda",
    )
    use_amp = dev.type == "cuda"
    amp_dtype = torch.bfloat16

    eval_len = min(recipe.long_seq_len or recipe.seq_len, recipe.max_position_embeddings)
    eval_len = max(recipe.seq_len, eval_len)
    periodic = eval_windows(val_stream, eval_len, recipe.eval_tokens)
    full = eval_windows(val_stream, eval_len)
    eval_rows = max(1, (recipe.batch_size * recipe.seq_len) // eval_len)
    gen = torch.Generator().manual_seed(seed)

    bar = _Progress(progress, total_steps, recipe.name)
    bar.log(
        f"{recipe.name}: {n_params/1e6:.2f} M params, vocab {vocab}, "
        f"train {len(train_stream):,} tokens ({len(train_files)} files), "
        f"val {len(val_stream):,} tokens ({len(val_files)} files), data {t_data:.1f}s"
    )
    say(f"params={n_params} vocab={vocab} train_tokens={len(train_stream)} val_tokens={len(val_stream)}")

    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    best_val, best_step, best_state = float("inf"), -1, None
    bad_evals = 0
    stopped = "steps"
    t_train = time.time()
    step = 0
    deadline = None
    if recipe.time_limit_s:
        deadline = t_start + recipe.time_limit_s - recipe.time_reserve_s
    time_adjusted = False

    def do_eval(step_done: int) -> float:
        nonlocal best_val, best_step, best_state, bad_evals
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
            if held_out is not None and cross is None:      # a draft is selected for agreeing on its target's text
                v = 1.0 - _teacher_agreement(model, teacher, held_out, dev, eval_rows)
            elif held_out is not None:                      # ... or, across tokenizers, for predicting it
                v = _evaluate(model, held_out, dev, eval_rows)
            else:
                v = _evaluate(model, periodic, dev, eval_rows)
        evals.append((step_done, v))
        if v < best_val:
            best_val, best_step, bad_evals = v, step_done, 0
            best_state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
        else:
            bad_evals += 1
        return v

    try:
        for step in range(total_steps):
            sched_step: float = step
            if deadline is not None:
                now = time.time()
                frac_time = (now - t_train) / max(1e-9, deadline - t_train)
                if frac_time * total_steps > step:
                    sched_step, time_adjusted = frac_time * total_steps, True
                if sched_step >= total_steps:
                    stopped = f"time budget {recipe.time_limit_s:.0f}s reached after {step} steps"
                    if not evals or evals[-1][0] != step:
                        do_eval(step)
                    break
            for g in opt.param_groups:
                g["lr"] = _lr_at(sched_step, recipe, total_steps)
            x = _batch(step, recipe, train_stream, generated, gen).to(dev, non_blocking=True)
            on_generated = generated is not None and step % recipe.generated_every == 0
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                if not kl or (recipe.hard_labels and on_generated):
                    loss = model(input_ids=x, labels=x, use_cache=False).loss
                else:
                    with torch.no_grad():
                        t_logp = torch.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1)
                    s_logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)
                    loss = torch.nn.functional.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1),
                                                      log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            lv = loss.item()
            losses.append(lv)
            done = step + 1
            val = None
            if done % recipe.eval_every == 0 or done == total_steps:
                val = do_eval(done)
                el = time.time() - t_train
                bar.log(
                    f"step {done:>5}/{total_steps}  train {loss_kind.replace('_to_teacher', '')} {lv:.3f}  "
                    + (f"held-out disagreement {val:.3f}" if held_out is not None and kl else
                       f"held-out generations CE {val:.3f}" if held_out is not None else
                       f"val CE {val:.3f} (ppl {math.exp(val):.1f})")
                    + f"  {el/done:.2f}s/step"
                )
                say(f"step={done} train_loss={lv:.4f} val_loss={val:.4f} elapsed={el:.0f}s")
            bar.update(done, loss=sum(losses[-20:]) / len(losses[-20:]), val=val)
            if val is not None and recipe.patience and bad_evals >= recipe.patience:
                stopped = f"early stop at step {done} (no val improvement in {recipe.patience} evals)"
                break
    finally:
        bar.close()
    steps_done = len(losses)
    train_wall = time.time() - t_train
    if best_state is None:
        do_eval(steps_done)
    model.load_state_dict(best_state)

    # ---- final evaluation on the whole validation split -------------------
    with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
        val_loss = _evaluate(model, full, dev, eval_rows)
    val_ppl = math.exp(val_loss)
    uni_ppl = unigram_ppl(train_stream, full[:, 1:], vocab)
    agreement = _teacher_agreement(model, teacher, periodic, dev, eval_rows) if kl else None
    gen_agreement = _teacher_agreement(model, teacher, held_out, dev, eval_rows) if kl and held_out is not None \
        else None
    gen_loss = _evaluate(model, held_out, dev, eval_rows) if held_out is not None else None

    # ---- save ---------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").to(getattr(torch, recipe.save_dtype))
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True
    model.config.use_cache = True
    model.save_pretrained(str(out), **save_kwargs)
    # fp16 weights on disk, but load as float32 by default (fast on CPUs)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(str(out))
    _tok.save_tokenizer(tok, out)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # portable across transformers 4.x/5.x
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")

    corpus_info = {
        "corpus": recipe.corpus,
        "stdlib": str(_corpus.stdlib_root()),
        "python": platform.python_version(),
        "train_files": len(train_files),
        "val_files": len(val_files),
        "train_tokens": int(len(train_stream)),
        "val_tokens": int(len(val_stream)),
        "fingerprint": _corpus.fingerprint(list(train_files) + list(val_files)),
        "limit_bytes": limit_bytes,
    }
    info = {
        "name": recipe.name,
        "description": recipe.description,
        "recipe": _recipe_dict(recipe),
        "params": int(n_params),
        "vocab_size": int(vocab),
        "tokenizer": recipe.tokenizer,
        "tokenizer_fingerprint": _tok.tokenizer_fingerprint(tok),
        "seed": seed,
        "device": str(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "steps": total_steps,
        "steps_done": steps_done,
        "stopped": stopped,
        "schedule_time_adjusted": time_adjusted,
        "best_step": best_step,
        "tokens_seen": int(steps_done * recipe.batch_size * recipe.seq_len),
        "val_loss": round(val_loss, 5),
        "val_ppl": round(val_ppl, 3),
        "unigram_ppl": round(uni_ppl, 3),
        "teacher_agreement": None if agreement is None else round(agreement, 4),
        "train_loss_kind": loss_kind,
        "teacher_generated_agreement": None if gen_agreement is None else round(gen_agreement, 4),
        "teacher_generated_loss": None if gen_loss is None else round(gen_loss, 5),
        "evals_metric": ("teacher_disagreement_on_generations" if kl else "cross_entropy_on_generations")
        if held_out is not None else "val_cross_entropy",
        "val_eval": {"windows": int(full.shape[0]), "window_len": int(full.shape[1])},
        "evals": [[s, round(v, 5)] for s, v in evals],
        "train_loss_first": round(losses[0], 5) if losses else None,
        "train_loss_last20": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5),
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "command": command,
        "corpus": corpus_info,
        "weights_dtype": recipe.save_dtype,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": _tokenizers_version(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    info["losses"] = losses
    return info


def _tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__


def _recipe_dict(r: Recipe) -> dict:
    d = dataclasses.asdict(r)
    d["betas"] = list(r.betas)
    return d


def build_model(
    name: str,
    out: str | os.PathLike | None = None,
    steps: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    limit_bytes: int | None = None,
    overrides: dict[str, Any] | None = None,
    command: str | None = None,
    threads: int | None = 2,
) -> Path:
    """Build model ``name`` from its recipe and return the output directory.

    ``out`` defaults to the user cache (``$DGOPT_CACHE/models/NAME`` or
    ``~/.cache/dgopt/models/NAME``).  ``overrides`` replaces recipe fields
    (e.g. ``{"hidden_size": 32}`` for smoke tests); ``limit_bytes`` trains on
    a deterministic slice of about that many bytes of source; ``threads`` is
    the number of CPU threads torch uses (CPU builds).
    """
    if name not in RECIPES:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    if overrides:
        recipe = dataclasses.replace(recipe, **overrides)
    out_dir = Path(out) if out is not None else cache_dir(name)
    if command is None:
        command = _default_command(name, out, steps, device, seed, limit_bytes)
    # train into a staging dir beside the target and swap it in at the end: an interrupted or failed build never
    # leaves a half-written model where a complete one (e.g. a committed asset) was
    import shutil
    import tempfile

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        info = train_recipe(
            recipe,
            staging,
            steps=steps,
            device=device,
            seed=seed,
            progress=progress,
            limit_bytes=limit_bytes,
            command=command,
            threads=threads,
        )
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        _print_summary(info, out_dir)
    return out_dir


def _default_command(name, out, steps, device, seed, limit_bytes) -> str:
    parts = ["python", "-m", "dgopt.models.train", "build", name]
    if out is not None:
        parts += ["--out", str(out)]
    if steps is not None:
        parts += ["--steps", str(steps)]
    if device != "cpu":
        parts += ["--device", device]
    if seed:
        parts += ["--seed", str(seed)]
    if limit_bytes is not None:
        parts += ["--corpus-limit", str(limit_bytes)]
    return shlex.join(parts)


def _print_summary(info: dict, out_dir: Path) -> None:
    try:
        from rich.console import Console

        print_ = Console().print
    except ImportError:  # pragma: no cover
        print_ = print
    print_(
        f"{info['name']}: {info['params']/1e6:.2f} M params, {info['steps_done']} steps "
        f"(best at {info['best_step']}), {info['train_wall_s']:.0f}s training\n"
        f"  validation loss {info['val_loss']:.4f}  ppl {info['val_ppl']:.2f}  "
        f"(unigram baseline ppl {info['unigram_ppl']:.2f})\n"
        f"  saved to {out_dir}"
    )


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dgopt.models.train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train a model from its recipe")
    b.add_argument("name", choices=sorted(RECIPES))
    b.add_argument("--out", default=None, help="output dir (default: user cache)")
    b.add_argument("--steps", type=int, default=None, help="optimizer steps (default: recipe)")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--corpus-limit", type=int, default=None, metavar="BYTES",
        help="train on a deterministic slice of about BYTES of source (smoke tests)",
    )
    b.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    b.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="list model recipes and where built models are")
    a = p.parse_args(argv)

    if a.cmd == "list":
        for row in list_models():
            ppl = f"  val ppl {row['val_ppl']}" if row["val_ppl"] else ""
            print(
                f"{row['name']:<16} {row['params']/1e6:6.2f} M  {row['where']:<7} "
                f"{row['description']}{ppl}" + (f"\n{'':<16} {row['path']}" if row["path"] else "")
            )
        return 0

    command = shlex.join(["python", "-m", "dgopt.models.train", *(argv if argv is not None else sys.argv[1:])])
    build_model(
        a.name,
        out=a.out,
        steps=a.steps,
        device=a.device,
        seed=a.seed,
        progress=not a.no_progress,
        limit_bytes=a.corpus_limit,
        command=command,
        threads=a.threads,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
