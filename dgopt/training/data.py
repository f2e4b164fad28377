"""Token data for training: the corpus as one token stream, random training windows, fixed evaluation windows,
the mean next-token loss over them and the unigram baseline."""

from __future__ import annotations

import math
from typing import Sequence

from ..models import corpus as _corpus


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


def random_windows(stream, rows: int, length: int, gen):
    """``rows`` windows of ``length`` tokens at random starts (drawn from ``gen``), int64."""
    import torch

    starts = torch.randint(0, len(stream) - length, (rows,), generator=gen)
    return stream[starts[:, None] + torch.arange(length)[None, :]].long()


def recipe_batch(step: int, recipe, stream, generated, gen):
    """Step `step`'s training rows: teacher generations on every generated_every-th step (if any), else corpus
    windows (long ones on every long_every-th step); always about batch_size * seq_len tokens."""
    import torch

    if generated is not None and step % recipe.generated_every == 0:
        rows = max(1, (recipe.batch_size * recipe.seq_len) // generated.shape[1])
        return generated[torch.randint(0, len(generated), (rows,), generator=gen)]
    long = recipe.long_every and recipe.long_seq_len and (step % recipe.long_every == recipe.long_every - 1)
    L = min(recipe.long_seq_len if long else recipe.seq_len, len(stream) - 1)
    rows = max(1, (recipe.batch_size * recipe.seq_len) // L)
    return random_windows(stream, rows, L, gen)


def mean_loss(model, windows, device, batch_rows: int) -> float:
    """Mean next-token cross-entropy over all predicted positions of ``windows``."""
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


def unigram_ppl(train_stream, targets, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model (counts from train)."""
    import torch

    counts = torch.bincount(train_stream.long(), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    nll = -logp[targets.long().reshape(-1)].mean().item()
    return math.exp(nll)


def source_files(sources: Sequence[str], limit_bytes: int | None = None):
    """(train, validation) files of ``dgopt train --data``'s text sources: ``stdlib`` (the corpus' own split) and
    files / directories (every text file under a directory, hidden ones and caches left out; split by the corpus'
    stable hash of the relative path). ``self`` is not text on disk: the caller generates it
    (:func:`dgopt.training.distill.teacher_generations`)."""
    from pathlib import Path

    train, val = [], []
    for src in sources:
        if src == "self":
            continue
        if src == "stdlib":
            t, v = _corpus.split_files("stdlib", limit_bytes=limit_bytes)
            train += t
            val += v
            continue
        root = Path(src)
        paths = sorted(p for p in root.rglob("*") if p.is_file() and _is_text(p)
                       and not any(q.startswith(".") or q == "__pycache__" for q in p.relative_to(root).parts)) \
            if root.is_dir() else [root]
        for p in paths:
            f = _corpus.CorpusFile(p, p.relative_to(root).as_posix() if root.is_dir() else p.name)
            (val if _corpus.is_validation(f.key) else train).append(f)
    return train, val


def _is_text(path) -> bool:
    """No NUL byte in the first 8 kB: skips weights, archives and other binaries under a --data directory."""
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def split_stream(train_stream, val_stream, min_val: int):
    """A validation stream of at least ``min_val`` tokens: the given one, or else the training stream's tail."""
    if len(val_stream) >= min_val or len(train_stream) < 4 * min_val:
        return train_stream, val_stream
    return train_stream[:-min_val], train_stream[-min_val:]
