"""Distillation data: a teacher's greedy generations, its agreement with a student, and the KL loss to it.

A draft is run on the text its target writes, not on the corpus, so the drafts learn from their target
(a recipe's ``teacher``): per-position KL to its distribution (same tokenizer), or its own greedy continuations of
corpus windows (``teacher_generated``), carried across as text when the tokenizers differ. These helpers are
reusable by any ``dgopt train`` subcommand that needs a model's own outputs (``--data self``).
"""

from __future__ import annotations

from pathlib import Path

from ..models import tokenizers_train as _tok
from .trainer import build_info, resolve_built

GEN_PROMPT, GEN_NEW, GEN_HELD_OUT = 16, 112, 128   # teacher-generated sequences: prompt and new tokens; held out


def same_tokenizer(ref: str, tok, me: tuple[str, str, str], role: str) -> bool:
    """Whether built model `ref` was trained with `tok` (no record: assumed so, and checked by vocab size later).
    me = (this build's name, its tokenizer's name, its corpus' Python). Refuses (ValueError, one line naming both)
    a tokenizer of the same name and vocabulary with other ids: a tokenizer retrained on another Python's stdlib,
    whose pairing would look valid and mean nothing."""
    info = build_info(ref)
    fp, mine = info.get("tokenizer_fingerprint"), _tok.tokenizer_fingerprint(tok)
    if fp is None or fp == mine:
        return True
    name, tok_name, python = me
    if info.get("tokenizer") == tok_name and info.get("vocab_size") == len(tok):
        theirs = (info.get("tokenizer_source") or {}).get("corpus_python") or info.get("corpus", {}).get("python")
        raise ValueError(f"{role}: {ref}'s tokenizer {tok_name} ({fp}, corpus Python {theirs}) differs from "
                         f"{name}'s {tok_name} ({mine}, corpus Python {python}): same name and vocabulary, other ids;"
                         f" build both with the shipped dgopt/assets/tokenizers/{tok_name}")
    return False


def load_built(ref: str, tok, me: tuple[str, str, str], role: str, device):
    """A built model (float32, eval) for `role` ('teacher' / 'init_from'), refusing another tokenizer."""
    from transformers import LlamaForCausalLM

    d: Path = resolve_built(ref)
    if not same_tokenizer(ref, tok, me, f"recipe.{role}"):
        raise ValueError(f"recipe.{role}: {ref} was trained with another tokenizer than this recipe's")
    m = LlamaForCausalLM.from_pretrained(str(d), dtype="float32").to(device)
    if m.config.vocab_size != len(tok):
        raise ValueError(f"recipe.{role}: {ref} has vocab {m.config.vocab_size}, this recipe's tokenizer {len(tok)}")
    return m


def kl_to_teacher(model, teacher, x):
    """KL(teacher || model) per position, averaged over rows (``batchmean`` over flattened positions)."""
    import torch

    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1)
    s_logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)
    return torch.nn.functional.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True,
                                      reduction="batchmean")


def teacher_agreement(model, teacher, windows, device, batch_rows: int) -> float:
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


def teacher_generations(teacher, stream, n: int, gen, device, bar, cross=None) -> "torch.Tensor":
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
