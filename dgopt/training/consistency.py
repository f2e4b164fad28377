"""Consistency training (CLLM, arXiv 2403.00835; hao-ai-lab/Consistency_LLM ``cllm/cllm_trainer_global.py``).

Jacobi decoding of a model trained only autoregressively fixes about one token per forward. A consistency-trained
model (CLLM) maps any intermediate Jacobi state of an n-token block to the block's fixed point (its greedy
continuation) in fewer forwards. The recipe:

1. trajectories (:func:`jacobi_trajectories`): block-wise Jacobi decoding of the original model, greedy, batched,
   with a KV cache of the committed prefix; per block every intermediate state and the fixed point are kept. The
   first guess is drawn from the prompt's tokens, as dgopt's Jacobi runtime draws it.
2. loss (:func:`consistency_loss`): CLLM's global consistency loss (soft cross-entropy of the model on
   ``prefix + state`` against its own detached distribution on ``prefix + fixed point``, positions whose inputs
   already equal the fixed point's masked out) + ``ar_weight`` x the autoregressive loss on ``prefix + fixed
   point`` (the prompt part is corpus text with ``--data stdlib``) + ``kd_weight`` x KL(original || model) on
   full-length windows of the training text (:func:`kd_loss`). The AR term alone does not hold perplexity: it sees
   the first prompt + blocks positions only and mostly the original's greedy text, which is repetitive; the KD term
   holds the next-token distribution where perplexity is measured (code-tiny, 12 min: perplexity +9.7% at the
   shipped model's Jacobi steps per block, where the AR term alone had cost +125%).

``dgopt train consistency MODEL_DIR -o OUT`` (or ``python -m dgopt.training.consistency``) runs both with fixed
seeds, early stopping on a validation split of the trajectories, and prints validation perplexity, greedy
agreement with the original and mean Jacobi steps per block before and after.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DgoptError

BUILD_INFO = "dgopt_build.json"


# --------------------------------------------------------------------------
# model loading and bad input
# --------------------------------------------------------------------------


def load_decoder(model_dir: str | Path, block: int, prompt_len: int, blocks: int, device: str = "cpu",
                 kd_len: int | None = None):
    """The model in ``model_dir`` (float32, eval), refusing what consistency training cannot use."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(model_dir)
    if not d.is_dir():
        raise DgoptError(f"MODEL_DIR {model_dir}: no such directory")
    if not (d / "config.json").is_file():
        raise DgoptError(f"MODEL_DIR {model_dir}: no config.json (not a model directory)")
    cfg = AutoConfig.from_pretrained(str(d))
    archs = getattr(cfg, "architectures", None) or []
    if getattr(cfg, "is_encoder_decoder", False) or not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel")
                                                            for a in archs):
        raise DgoptError(f"MODEL_DIR {model_dir}: config.architectures {archs} is not a decoder-only causal LM")
    if block < 1:
        raise DgoptError(f"--block {block}: must be >= 1")
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    need = prompt_len + blocks * block + 1
    if limit is not None and block + 1 > limit:
        raise DgoptError(f"--block {block}: larger than the model's {limit} positions (max_position_embeddings)")
    if limit is not None and need > limit:
        raise DgoptError(f"--block {block}: prompt {prompt_len} + {blocks} blocks of {block} needs {need} positions, "
                         f"the model has {limit} (max_position_embeddings)")
    if kd_len is not None and limit is not None and kd_len > limit:
        raise DgoptError(f"--kd-len {kd_len}: longer than the model's {limit} positions (max_position_embeddings)")
    if device == "cuda" and not torch.cuda.is_available():
        raise DgoptError("--device cuda: no CUDA device here (or torch is the CPU build)")
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).to(device)
    model.eval()
    return model


# --------------------------------------------------------------------------
# trajectories
# --------------------------------------------------------------------------


@dataclass
class Trajectories:
    """Block-wise Jacobi trajectories of a batch of prompts.

    seq: [B, P + blocks * block] prompt + greedy continuation (the fixed points, concatenated);
    states[j]: [T_j + 1, B, block] the states of block j, states[j][0] the first guess, the last the fixed point;
    steps[j]: [B] forwards until row b's state equaled the fixed point (an AR-trained model: about ``block``).
    """

    prompt_len: int
    block: int
    seq: "torch.Tensor"
    states: list
    steps: list

    @property
    def mean_steps(self) -> float:
        import torch
        return float(torch.stack(self.steps).float().mean()) if self.steps else 0.0

    def cat(self, other: "Trajectories") -> "Trajectories":
        import torch
        assert (self.prompt_len, self.block, len(self.states)) == (other.prompt_len, other.block, len(other.states))
        states = []
        for a, b in zip(self.states, other.states):
            t = max(len(a), len(b))    # pad the shorter trajectory with its fixed point
            a = torch.cat([a, a[-1:].expand(t - len(a), -1, -1)]) if len(a) < t else a
            b = torch.cat([b, b[-1:].expand(t - len(b), -1, -1)]) if len(b) < t else b
            states.append(torch.cat([a, b], 1))
        return Trajectories(self.prompt_len, self.block, torch.cat([self.seq, other.seq]), states,
                            [torch.cat([a, b]) for a, b in zip(self.steps, other.steps)])

    def rows(self, idx) -> "Trajectories":
        return Trajectories(self.prompt_len, self.block, self.seq[idx], [s[:, idx] for s in self.states],
                            [s[idx] for s in self.steps])


def jacobi_trajectories(model, prompts, block: int, blocks: int, seed: int = 0) -> Trajectories:
    """Greedy block-wise Jacobi decoding of ``prompts`` ([B, P] token ids), ``blocks`` blocks of ``block`` tokens.

    One forward per iteration over [x, guess] for the whole batch, x the last committed token, the committed prefix
    in the KV cache; the batch's block ends when every row reached its fixed point (a converged row's state stays
    put, so its recorded trajectory ends there)."""
    import torch
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    prompts = prompts.to(dev)
    B, P = prompts.shape
    gen = torch.Generator().manual_seed(seed)
    seq = prompts
    states_all, steps_all = [], []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        if P > 1:
            model(input_ids=prompts[:, :-1], cache=cache, use_cache=True)
        for _ in range(blocks):
            cl = seq.shape[1] - 1                       # cached: everything before x
            x = seq[:, -1:]
            # first guess: tokens drawn from the row's prompt (dgopt's Jacobi runtime guesses so)
            y = torch.gather(prompts, 1, torch.randint(0, P, (B, block), generator=gen).to(dev))
            pos = torch.arange(cl, cl + block + 1, device=dev)[None].expand(B, -1)
            states = [y]
            for _ in range(block + 1):                  # a causal model fixes at least one token per forward
                logits = model(input_ids=torch.cat([x, y], 1), position_ids=pos, cache=cache,
                               use_cache=True).logits
                y_new = logits[:, :block].argmax(-1)
                if torch.equal(y_new, y):               # fixed point: keep x, y_1..y_{n-1} cached
                    cache.crop(-1)                      # (crop takes the count removed)
                    break
                cache.crop(-(block + 1))
                y = y_new
                states.append(y)
            st = torch.stack(states)                    # [T+1, B, n]
            fixed = st[-1]
            same = (st == fixed[None]).all(-1)           # [T+1, B]
            # steps: index of the first state equal to the fixed point (the forwards it took)
            steps = torch.where(same, torch.arange(len(st), device=dev)[:, None], len(st)).min(0).values
            states_all.append(st.cpu())
            steps_all.append(steps.cpu())
            seq = torch.cat([seq, fixed], 1)
    return Trajectories(P, block, seq.cpu(), states_all, steps_all)


def collect(model, prompts, block: int, blocks: int, batch: int, seed: int, bar=None) -> Trajectories:
    out = None
    for i in range(0, len(prompts), batch):
        t = jacobi_trajectories(model, prompts[i:i + batch], block, blocks, seed + i)
        out = t if out is None else out.cat(t)
        if bar:
            bar(min(i + batch, len(prompts)), len(prompts))
    return out


# --------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------


def self_prompts(model, n: int, length: int, seed: int, batch: int = 64):
    """Prompts the model samples itself (temperature 1, from its BOS/EOS id): no tokenizer or corpus needed."""
    import torch
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    start = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    with torch.no_grad():
        for i in range(0, n, batch):
            b = min(batch, n - i)
            ids = torch.full((b, 1), int(start), dtype=torch.long, device=dev)
            cache = DynamicCache(config=model.config)
            nxt = ids
            for _ in range(length):
                logits = model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1].float()
                probs = torch.softmax(logits, -1).cpu()
                nxt = torch.multinomial(probs, 1, generator=gen).to(dev)
                ids = torch.cat([ids, nxt], 1)
            rows.append(ids[:, 1:].cpu())
    return torch.cat(rows)


def corpus_prompts(model_dir: Path, data: Sequence[str], n_train: int, n_val: int, length: int, seed: int):
    """Random windows of ``length`` tokens from the stdlib corpus (its own train / validation split) or from files
    (split by a stable hash of the path, like the corpus), encoded with the model's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from ..models import corpus as _corpus
    from .data import encode_stream

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.eos_token_id is None:
        tok.eos_token_id = 0
    if list(data) == ["stdlib"]:
        # prompts need a few MB of training text, not all 13 MB to encode; validation keeps every file
        train_files, val_files = _corpus.split_files("stdlib", limit_bytes=3_000_000)[0], _corpus.split_files()[1]
    else:
        files = []
        for p in data:
            q = Path(p)
            if q.is_dir():
                files += sorted(q.rglob("*.py"))
            elif q.is_file():
                files.append(q)
            else:
                raise DgoptError(f"--data {p}: no such file or directory")
        if not files:
            raise DgoptError(f"--data {' '.join(data)}: no files (a directory gives its *.py)")
        val_files = [f for f in files if _corpus.is_validation(str(f))] or files[-1:]
        train_files = [f for f in files if f not in val_files] or files
    tr, va = encode_stream(tok, train_files), encode_stream(tok, val_files)
    if len(tr) <= length or len(va) <= length:
        raise DgoptError(f"--data {' '.join(data)}: fewer than {length + 1} tokens of text")
    g = torch.Generator().manual_seed(seed)

    def windows(stream, n):
        starts = torch.randint(0, len(stream) - length, (n,), generator=g)
        return torch.stack([stream[s:s + length] for s in starts.tolist()]).long()

    return windows(tr, n_train), windows(va, n_val), va, tr


# --------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------


def sample_batch(traj: Trajectories, rows, gen):
    """One training batch: a block j (the same for every row: equal lengths, no padding) and per row a random
    unconverged state of that block. Returns (fixed inputs, noisy inputs, block start) or None if every picked row
    had converged at its first guess."""
    import torch

    j = int(torch.randint(0, len(traj.states), (1,), generator=gen))
    steps = traj.steps[j][rows]
    keep = steps > 0
    if not keep.any():
        return None
    rows, steps = rows[keep], steps[keep]
    t = (torch.rand(len(rows), generator=gen) * steps.float()).long()        # 0 .. steps-1: not the fixed point
    state = traj.states[j][t, rows]                                         # [b, n]
    s = traj.prompt_len + j * traj.block
    fixed = traj.seq[rows, :s + traj.block]
    noisy = torch.cat([traj.seq[rows, :s], state], 1)
    return fixed, noisy, s


def consistency_loss(model, fixed, noisy, s: int, ar_weight: float):
    """CLLM global consistency loss + ar_weight x AR loss (CLLM's `consistency_training_step`, soft_cross_entropy).

    fixed, noisy: [b, s + n] the prefix followed by the fixed point / by an intermediate state of block [s, s + n).
    Position i in s-1 .. s+n-2 predicts token i+1 of the block; its target is the model's own (detached)
    distribution at i on the fixed point. Positions whose inputs up to i equal the fixed point's are masked: their
    logits are the fixed point's already."""
    import torch
    import torch.nn.functional as F

    b, L = fixed.shape
    n = L - s
    logits = model(input_ids=torch.cat([fixed, noisy]), use_cache=False).logits.float()
    lf, ln = logits[:b], logits[b:]
    ar = F.cross_entropy(lf[:, :-1].reshape(-1, lf.size(-1)), fixed[:, 1:].reshape(-1))
    target = torch.softmax(lf[:, s - 1:L - 1].detach(), -1)
    logp = torch.log_softmax(ln[:, s - 1:L - 1], -1)
    diff = (noisy[:, s:] != fixed[:, s:]).long()
    mask = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=diff.device), diff[:, :-1].cumsum(1)], 1) > 0
    ce = -(target * logp).sum(-1)                    # [b, n]
    cons = (ce * mask).sum() / mask.sum().clamp(min=1)
    return cons + ar_weight * ar, float(cons.detach()), float(ar.detach())


def kd_loss(model, orig, windows):
    """KL(original || model) per token on ``windows`` ([b, L] real text): holds the model's next-token
    distribution where perplexity is measured, at every position of a full-length window (the consistency and
    AR terms only see the first prompt + blocks positions, and the AR term only the original's greedy text)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        t = torch.log_softmax(orig(input_ids=windows, use_cache=False).logits.float(), -1)
    s = torch.log_softmax(model(input_ids=windows, use_cache=False).logits.float(), -1)
    return F.kl_div(s.reshape(-1, s.size(-1)), t.reshape(-1, t.size(-1)), log_target=True, reduction="batchmean")


# --------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------


def perplexity(model, windows, batch: int = 8) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = windows[i:i + batch].to(next(model.parameters()).device)
            lg = model(input_ids=x, use_cache=False).logits.float()
            total += float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.size(-1)), x[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += x[:, 1:].numel()
    return math.exp(total / max(1, count))


def greedy_agreement(model, traj: Trajectories, batch: int = 32) -> float:
    """Fraction of the original's greedy tokens (the fixed points) that `model`'s argmax reproduces, teacher
    forced on the original's sequences."""
    import torch

    P = traj.prompt_len
    same = count = 0
    with torch.no_grad():
        for i in range(0, len(traj.seq), batch):
            x = traj.seq[i:i + batch].to(next(model.parameters()).device)
            a = model(input_ids=x, use_cache=False).logits[:, P - 1:-1].argmax(-1)
            same += int((a == x[:, P:]).sum())
            count += a.numel()
    return same / max(1, count)


def val_loss(model, traj: Trajectories, batch: int, ar_weight: float, seed: int = 1234) -> float:
    import torch

    gen = torch.Generator().manual_seed(seed)
    tot, k = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(traj.seq), batch):
            rows = torch.arange(i, min(i + batch, len(traj.seq)))
            for _ in range(len(traj.states)):
                bt = sample_batch(traj, rows, gen)
                if bt is None:
                    continue
                loss, _, _ = consistency_loss(model, *bt, ar_weight)
                tot += float(loss)
                k += 1
    return tot / max(1, k)


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Bar:
    """A one-line progress bar on a terminal, plain lines every few percent in a log file."""

    def __init__(self, label: str):
        self.label, self.tty, self.last = label, sys.stderr.isatty(), -1

    def __call__(self, done: int, total: int, extra: str = "") -> None:
        pct = int(100 * done / max(1, total))
        if self.tty:
            w = 30
            fill = int(w * done / max(1, total))
            sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (w - fill)}] {done}/{total} {extra}   ")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif pct // 5 != self.last // 5 or done >= total:
            _log(f"{self.label} {done}/{total} {extra}")
        self.last = pct


def train(model_dir: str | Path, out: str | Path, data: Sequence[str] = ("self",), block: int = 16,
          minutes: float = 10.0, device: str = "cpu", seed: int = 0, samples: int = 512, val_samples: int = 64,
          prompt_len: int = 32, blocks: int = 3, batch: int = 16, lr: float = 1e-4, ar_weight: float = 0.0,
          kd_weight: float = 5.0, kd_batch: int = 2, kd_len: int = 256, eval_every: int = 25, patience: int = 4,
          threads: int | None = None, command: str | None = None, collect_batch: int = 64, quiet: bool = False,
          max_steps: int | None = None) -> dict:
    """Consistency-train the model in ``model_dir`` and save it to ``out`` (written to a staging dir beside it and
    renamed at the end: nothing half-written). Returns the build info written to ``out/dgopt_build.json``."""
    import copy
    import random

    import numpy as np
    import torch

    log = (lambda m: None) if quiet else _log
    t_start = time.time()
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    data = list(data) or ["self"]
    if minutes <= 0:
        raise DgoptError(f"--minutes {minutes}: must be > 0")
    if samples < 1 or val_samples < 1:
        raise DgoptError("--samples: must be >= 1")
    if kd_weight < 0 or ar_weight < 0:
        raise DgoptError(f"--{'kd' if kd_weight < 0 else 'ar'}-weight: must be >= 0")
    if kd_weight and (kd_batch < 1 or kd_len < 2):
        raise DgoptError(f"--kd-{'batch' if kd_batch < 1 else 'len'}: must be >= {1 if kd_batch < 1 else 2}")
    src = Path(model_dir)
    if data != ["self"] and src.is_dir() and not (src / "tokenizer.json").is_file() \
            and not (src / "tokenizer_config.json").is_file():
        raise DgoptError(f"--data {' '.join(data)}: MODEL_DIR {model_dir} has no tokenizer (use --data self)")
    model = load_decoder(src, block, prompt_len, blocks, device, kd_len if kd_weight else None)
    orig = copy.deepcopy(model)
    for p in orig.parameters():
        p.requires_grad_(False)

    # prompts
    ppl_windows = None
    if data == ["self"]:
        log(f"sampling {samples + val_samples} prompts of {prompt_len} tokens from the model itself")
        pr = self_prompts(model, samples + val_samples, prompt_len, seed)
        tr_prompts, va_prompts = pr[:samples], pr[samples:]
        tr_stream = None
    else:
        tr_prompts, va_prompts, va_stream, tr_stream = corpus_prompts(src, data, samples, val_samples, prompt_len,
                                                                      seed)
        from .data import eval_windows
        ppl_windows = eval_windows(va_stream, 256, 8192)   # 32 windows: a 2-core budget

    # trajectories of the original model
    t0 = time.time()
    traj = collect(model, tr_prompts, block, blocks, collect_batch, seed, None if quiet else _Bar("trajectories"))
    vtraj = collect(model, va_prompts, block, blocks, collect_batch, seed + 10 ** 6)
    collect_s = time.time() - t0
    steps_before = vtraj.mean_steps
    log(f"trajectories: {len(traj.seq)} train + {len(vtraj.seq)} val prompts x {blocks} blocks of {block} in "
        f"{collect_s:.0f}s; mean Jacobi steps per block (val) {steps_before:.2f}")
    if ppl_windows is None:        # no corpus: perplexity on the held-out sequences themselves
        ppl_windows = vtraj.seq
    ppl_before = perplexity(orig, ppl_windows)

    # (the KD windows are drawn from the batches' generator: the shipped recipe was trained so, and a seed gives one
    # run; switching KD on or off therefore also changes the batches' order)
    def kd_windows(gen):
        """A KD batch: random kd_len windows of the training text (corpus), or of the self-sampled prompts."""
        if tr_stream is None:
            return tr_prompts[torch.randint(0, len(tr_prompts), (kd_batch,), generator=gen)].to(device)
        L = min(kd_len, len(tr_stream) - 1)
        st = torch.randint(0, len(tr_stream) - L, (kd_batch,), generator=gen).tolist()
        return torch.stack([tr_stream[i:i + L] for i in st]).long().to(device)

    # early stopping's KD term: held-out text (random starts in the validation text, rarely overlapping the
    # perplexity's windows; self: 8 more sequences sampled for it alone, apart from the perplexity's)
    if not kd_weight:
        kd_val = None
    elif tr_stream is None:
        kd_val = self_prompts(model, 8, prompt_len, seed + 3).to(device)
    else:
        g_val = torch.Generator().manual_seed(seed + 7)
        L = min(kd_len, len(va_stream) - 1)
        kd_val = torch.stack([va_stream[i:i + L] for i in
                              torch.randint(0, len(va_stream) - L, (4,), generator=g_val).tolist()]).long().to(device)

    def validate():
        v = val_loss(model, vtraj, batch, ar_weight)
        if kd_weight:
            with torch.no_grad():
                v += kd_weight * float(kd_loss(model, orig, kd_val))
        return v

    # train
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    budget = minutes * 60.0
    t_train = time.time()
    best = validate()
    best_state, best_step, bad, step = copy.deepcopy(model.state_dict()), 0, 0, 0
    evals = [[0, round(best, 5)]]
    log(f"validation loss before training {best:.4f}")
    bar = None if quiet else _Bar("consistency")
    losses, stopped = [], "time budget"
    while True:
        el = time.time() - t_train
        if el >= budget:
            stopped = f"time budget {minutes:g} min reached after {step} steps"
            break
        if max_steps is not None and step >= max_steps:
            stopped = f"{max_steps} steps done"
            break
        rows = torch.randperm(len(traj.seq), generator=gen)[:batch]
        bt = sample_batch(traj, rows, gen)
        if bt is None:
            continue
        warm = min(1.0, (step + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        loss, cons, ar = consistency_loss(model, *[x.to(device) if hasattr(x, "to") else x for x in bt], ar_weight)
        kd = 0.0
        if kd_weight:
            kdl = kd_loss(model, orig, kd_windows(gen))
            loss, kd = loss + kd_weight * kdl, float(kdl.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append([round(cons, 4), round(ar, 4), round(kd, 4)])
        if bar:
            bar(int(min(el, budget)), int(budget), f"s  step {step} consistency {cons:.3f} ar {ar:.3f} kd {kd:.4f}")
        if step % eval_every == 0:
            model.eval()
            v = validate()
            model.train()
            evals.append([step, round(v, 5)])
            if v < best:
                best, best_state, best_step, bad = v, copy.deepcopy(model.state_dict()), step, 0
            else:
                bad += 1
            log(f"step {step}: validation loss {v:.4f} (best {best:.4f} at {best_step})")
            if patience and bad >= patience:
                stopped = f"early stop: {patience} evaluations without improvement (best at step {best_step})"
                break
    train_s = time.time() - t_train
    if step % eval_every:       # the last steps were not evaluated yet
        model.eval()
        v = validate()
        evals.append([step, round(v, 5)])
        if v < best:
            best, best_state, best_step = v, copy.deepcopy(model.state_dict()), step
    model.load_state_dict(best_state)
    model.eval()

    # report
    after = collect(model, va_prompts, block, blocks, collect_batch, seed + 10 ** 6)
    own = perplexity(model, ppl_windows)
    agree = greedy_agreement(model, vtraj)
    info = {
        "name": Path(out).name,
        "description": f"consistency-trained (CLLM) from {src.name}: Jacobi converges in fewer steps per block",
        "base": str(src.name),
        "method": "cllm-global" + ("+kd" if kd_weight else ""),
        "data": data,
        "block": block, "blocks": blocks, "prompt_len": prompt_len,
        "samples": samples, "val_samples": val_samples,
        "batch": batch, "lr": lr, "ar_weight": ar_weight, "kd_weight": kd_weight,
        **({"kd_batch": kd_batch, "kd_len": kd_len} if kd_weight else {}),
        "seed": seed, "device": device, "threads": torch.get_num_threads() if device == "cpu" else None,
        "steps_done": step, "best_step": best_step, "stopped": stopped,
        "evals": evals, "train_loss_first": losses[0] if losses else None,
        "train_loss_last20": [round(sum(x[i] for x in losses[-20:]) / max(1, len(losses[-20:])), 4)
                              for i in (0, 1, 2)] if losses else None,
        "val_ppl": round(own, 3), "val_ppl_base": round(ppl_before, 3),
        "val_ppl_on": "corpus validation windows" if data != ["self"] else "held-out self-sampled sequences",
        "greedy_agreement": round(agree, 4),
        "jacobi_steps_per_block_before": round(steps_before, 3),
        "jacobi_steps_per_block_after": round(after.mean_steps, 3),
        "collect_s": round(collect_s, 1), "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "command": command,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _save(model, src, Path(out), info)
    torch.set_num_threads(threads_before)
    return info


def _save(model, src: Path, out: Path, info: dict) -> None:
    """Weights as float16 (config says float32: from_pretrained upcasts, the fast dtype on CPUs), the base's
    tokenizer files, the build info; staged beside ``out`` and swapped in."""
    import torch

    from .build import staged
    with staged(out) as staging:
        half = model.to(torch.float16)
        half.config.dtype = "float32"
        half.save_pretrained(str(staging))
        cfg = json.loads((staging / "config.json").read_text())
        cfg["dtype"] = "float32"
        (staging / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        model.to(torch.float32)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (src / f).is_file():
                shutil.copy(src / f, staging / f)
        (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        for f in staging.iterdir():
            f.chmod(0o644)


def summary(info: dict) -> str:
    return (f"{info['name']}: {info['steps_done']} steps (best at {info['best_step']}; {info['stopped']}), "
            f"{info['train_wall_s']:.0f}s training, {info['collect_s']:.0f}s trajectories\n"
            f"  validation perplexity {info['val_ppl']:.2f} (original {info['val_ppl_base']:.2f}; "
            f"{info['val_ppl_on']})\n"
            f"  greedy agreement with the original {info['greedy_agreement']:.3f}\n"
            f"  mean Jacobi steps per block of {info['block']}: {info['jacobi_steps_per_block_before']:.2f} -> "
            f"{info['jacobi_steps_per_block_after']:.2f}")


# --------------------------------------------------------------------------
# recipes: `dgopt models build NAME` rebuilds a shipped consistency-trained model
# --------------------------------------------------------------------------

#: the arguments of :func:`train` that built each shipped model (its dgopt_build.json has the command and seed)
RECIPES = {
    # consistency + 5 x KL to code-tiny on 256-token stdlib windows, no AR term; a step count (the time budget is a
    # safety cap 12x above the 31 min it took on one 2-core EPYC thread), so the build does not depend on the
    # machine's speed (a rebuild gave byte-identical weights)
    "code-tiny-cllm": dict(base="code-tiny", data=["stdlib"], block=8, minutes=360.0, max_steps=2700, samples=3072,
                           val_samples=32, prompt_len=32, blocks=2, batch=8, lr=1e-4, ar_weight=0.0, kd_weight=5.0,
                           kd_batch=2, kd_len=256, eval_every=150, patience=0, threads=1),
}


def build(name: str, out: str | Path | None = None, device: str = "cpu", seed: int = 0,
          command: str | None = None) -> Path:
    from .trainer import cache_dir, model_dir

    r = dict(RECIPES[name])
    out = Path(out) if out is not None else cache_dir(name)
    info = train(model_dir(r.pop("base")), out, device=device, seed=seed, command=command, **r)
    print(summary(info))
    return out


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


HELP = "consistency training (CLLM): Jacobi decoding of the result converges in fewer steps per block"


def _standalone_arguments(p) -> None:
    """The options `dgopt train` shares (its common parser) for `python -m dgopt.training.consistency`."""
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a causal LM directory (config.json + weights)")
    p.add_argument("-o", "--out", required=True, help="output model directory")
    p.add_argument("--data", nargs="+", default=["self"], metavar="self|stdlib|PATH",
                   help="prompts: sampled by the model itself (no tokenizer needed), stdlib corpus windows, or "
                        "files/directories of text (default self)")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget (default 10)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_arguments(p) -> None:
    """This subcommand's own options (`dgopt train consistency`; --data self here = prompts the model samples from
    its BOS id, token ids only)."""
    p.add_argument("--block", type=int, default=16, help="Jacobi block size n (default 16)")
    p.add_argument("--samples", type=int, default=512, help="training prompts (default 512)")
    p.add_argument("--val-samples", type=int, default=64, help="validation prompts (default 64)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--blocks", type=int, default=3, help="Jacobi blocks per prompt (default 3)")
    p.add_argument("--batch", type=int, default=16, help="training rows per step (default 16)")
    p.add_argument("--ar-weight", type=float, default=0.0,
                   help="lambda: weight of the AR loss on the original's greedy text (default 0: off; CLLM's own "
                        "recipe uses 1, which here cost far more perplexity than --kd-weight)")
    p.add_argument("--kd-weight", type=float, default=5.0,
                   help="weight of KL(original || model) on full-length windows of the training text (default 5; "
                        "0: off); holds the perplexity, at some cost in Jacobi steps (docs/cllm.md)")
    p.add_argument("--kd-batch", type=int, default=2, help="KD windows per step (default 2)")
    p.add_argument("--kd-len", type=int, default=256,
                   help="KD window tokens (default 256; clipped to the text; with --data self the KD windows are the "
                        "sampled prompts, --prompt-len tokens)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")


def run(a, common=None) -> int:
    """`dgopt train consistency` (common: the checked shared options) or the standalone command (common: None)."""
    c = common or a
    own = ("block", "samples", "val_samples", "prompt_len", "blocks", "batch", "ar_weight", "kd_weight", "kd_batch",
           "kd_len", "eval_every", "patience")
    command = (common.command + " " + shlex.join(f"--{k.replace('_', '-')}={getattr(a, k)}" for k in own)) if common \
        else shlex.join(["python", "-m", "dgopt.training.consistency", *sys.argv[1:]])
    info = train(c.model_dir, c.out, data=list(c.data), block=a.block, minutes=c.minutes or 10.0, device=c.device,
                 seed=c.seed, samples=a.samples, val_samples=a.val_samples, prompt_len=a.prompt_len, blocks=a.blocks,
                 batch=a.batch, lr=c.lr or 1e-4, ar_weight=a.ar_weight, kd_weight=a.kd_weight,
                 kd_batch=a.kd_batch, kd_len=a.kd_len, eval_every=a.eval_every,
                 patience=a.patience, threads=c.threads, max_steps=c.max_steps,
                 command=command)
    print(summary(info))
    print(f"  saved to {a.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dgopt.training.consistency", description=__doc__.split("\n")[0])
    _standalone_arguments(p)
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        return run(a)
    except DgoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
