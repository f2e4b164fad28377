"""`dgopt train recycle MODEL_DIR -o OUT`: train a recyclable module (dgopt.models.recycle) for a frozen target.

Teacher = the target itself: one frozen target forward per batch gives the post-norm hidden states (regression
targets and chain inputs) and the next-token distributions (soft labels). The loss unrolls the module's chain
UNROLL steps from every position (step j reads the module's own hidden state from step j-1, as at decode time),
so the training sees the chain's drift and not only one step.

Data: the rows are the target's own writing (Medusa-2 / EAGLE self-distillation): PROMPT tokens, then NEW tokens
the target continues them with, half greedy (what greedy decoding verifies: a small model's greedy text repeats
itself in ways no human text does, and a module trained on human text misses them), half sampled at temperature 1
(diversity). The prompts: `--data stdlib` / PATH...: windows of that text (tokenized with the target's tokenizer);
`--data self` needs no text and no tokenizer: BOS + 3 random ids extended by the target's own sampling.

Validation (greedy continuations of held-out prompts): the top-1 agreement of the module's first proposal with the
target's greedy next-next token, and the chain's mean accepted length at k (the leading proposals equal to the
target's argmax: on the target's own greedy text exactly what verification accepts). The shared loop
(dgopt/training/trainer.py) keeps the best state by accepted length and stops early.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import ModelError
from ..models import recycle as R

UNROLL = 4                 # chain steps trained from each position
PROMPT, NEW = 16, 112      # rows: 128 tokens (--data self: a sampled prompt of 16, then the continuation)
FEAT_W = 1.0               # weight of the feature regression next to the soft cross-entropy


def _load_target(model_dir: str, device):
    import torch
    from transformers import AutoModelForCausalLM
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        from .trainer import model_dir as built
        try:
            p = built(model_dir)
        except (FileNotFoundError, KeyError) as e:
            raise ModelError(f"MODEL_DIR: {e.args[0] if e.args else e}") from None
    m = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, attn_implementation="eager")
    R.final_norm(m)   # refuses unsupported families early
    for q in m.parameters():
        q.requires_grad_(False)
    return m.eval().to(device), p


def _corpus_streams(data: list[str], target_dir: Path):
    """(train, val) int32 token streams of the text named by --data, tokenized with the target's tokenizer."""
    from transformers import AutoTokenizer

    from ..models import corpus as C
    from .data import encode_stream
    if not any((target_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(f"--data: {target_dir} has no tokenizer; use --data self")
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    if data == ["stdlib"]:
        train, val = C.split_files("stdlib")
    else:
        files = []
        for d in data:
            p = Path(d)
            if not p.exists():
                raise ModelError(f"--data: {p} does not exist")
            files += sorted(p.rglob("*.py")) + sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        if len(files) < 2:
            raise ModelError("--data: need at least 2 text files (one is held out for validation)")
        val, train = files[: max(1, len(files) // 30)], files[max(1, len(files) // 30):]
    return encode_stream(tok, train), encode_stream(tok, val)


def _sample_rows(target, n: int, gen, device, vocab: int, bos: int, greedy: bool, prompts=None):
    """n rows of PROMPT + NEW tokens the target writes itself, in chunks of 256 rows. The prompt: `prompts` [n,
    PROMPT], or BOS + 3 random ids sampled on at temperature 1 up to PROMPT tokens; the continuation greedy (or
    sampled). A plain KV-cached loop: generate()'s per-step overhead is many times the 5 M-parameter forward on a
    shared CPU."""
    import torch
    out = []
    for c in range(0, n, 256):
        m = min(256, n - c)
        if prompts is not None:
            x = prompts[c:c + m].to(device)
        else:
            x = torch.cat([torch.full((m, 1), bos), torch.randint(1, vocab, (m, 3), generator=gen)], 1).to(device)
        toks, past, cur = [x], None, x
        with torch.no_grad():
            for i in range(PROMPT + NEW - x.shape[1]):
                o = target(input_ids=cur, past_key_values=past, use_cache=True)
                past, logits = o.past_key_values, o.logits[:, -1].float()
                if greedy and x.shape[1] + i >= PROMPT:
                    cur = logits.argmax(-1, keepdim=True)
                else:
                    u = torch.rand(logits.shape, generator=gen).to(device).clamp_min(1e-20)
                    cur = (logits - torch.log(-torch.log(u))).argmax(-1, keepdim=True)   # Gumbel-max: a sample
                toks.append(cur)
        out.append(torch.cat(toks, 1).cpu())
    return torch.cat(out)


def top_tokens(rows, vocab: int, keep: int) -> list[int] | None:
    """The module's draft vocabulary (EAGLE-3's reduced draft vocabulary): the `keep` tokens the target writes most
    often in `rows`, sorted; None when keep covers the vocabulary. The chain's LM head then reads keep columns: on a
    CPU the head's weights are most of a chain step's memory traffic. A token outside it is never proposed, which
    verification treats like any other miss."""
    import torch
    if not keep or keep >= vocab:
        return None
    counts = torch.bincount(rows.reshape(-1), minlength=vocab)
    return sorted(torch.argsort(counts, descending=True, stable=True)[:keep].tolist())


def _windows(stream, n: int, seq: int, gen):
    import torch
    starts = torch.randint(0, len(stream) - seq, (n,), generator=gen)
    return stream[starts[:, None] + torch.arange(seq)[None, :]].long()


def _teacher(target, x):
    import torch
    with torch.no_grad():
        hn = target.model(input_ids=x).last_hidden_state
        return hn, torch.log_softmax(target.get_output_embeddings()(hn), -1)


def chain_loss(module, frozen, x, hn, logp, gen=None, ce_frac: float = 1.0):
    """Unrolled chain loss over a batch: from every position t, UNROLL steps reading the module's own hidden.
    Soft cross-entropy against the target's distribution on a random ce_frac of the positions (the LM head over
    the whole vocabulary is most of a step's cost on a CPU), feature regression on all of them."""
    import torch
    T = x.shape[1]
    L = T - UNROLL
    h = hn[:, :L]
    total = 0.0
    for j in range(UNROLL):
        h = frozen.norm(module(h, frozen.embed(x[:, 1 + j:1 + j + L])))
        hs, ps = h.reshape(-1, h.shape[-1]), logp[:, 1 + j:1 + j + L].reshape(-1, logp.shape[-1])
        if ce_frac < 1.0:
            sel = torch.randperm(hs.shape[0], generator=gen)[:max(1, int(hs.shape[0] * ce_frac))].to(hs.device)
            hs, ps = hs[sel], ps[sel]
        ce = -(ps.exp() * torch.log_softmax(frozen.head(hs), -1)).sum(-1).mean()
        feat = torch.nn.functional.smooth_l1_loss(h, hn[:, 1 + j:1 + j + L])
        total = total + ce + FEAT_W * feat
    return total / UNROLL


def evaluate(module, frozen, target, rows, k: int) -> dict:
    """Agreement of the first proposal with the target's greedy next-next token, and the chain's mean accepted
    length at k: the leading proposals that equal the target's argmax, the chain reading the row's tokens. On the
    target's own greedy text that is exactly what verification accepts; on other text it is a close proxy."""
    import torch
    module.eval()
    acc_sum = n = first = 0
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            x = rows[i:i + 16]
            hn, logp = _teacher(target, x)
            want = logp.argmax(-1)
            L = x.shape[1] - k
            h = hn[:, :L]
            alive = torch.ones(x.shape[0], L, dtype=torch.bool)
            accepted = torch.zeros(x.shape[0], L)
            for j in range(k):
                h, logits = frozen.step(module, h, x[:, 1 + j:1 + j + L])
                ok = logits.argmax(-1) == want[:, 1 + j:1 + j + L]
                if j == 0:
                    first += int(ok.sum())
                alive &= ok
                accepted += alive
            acc_sum += float(accepted.sum())
            n += accepted.numel()
    module.train()
    return {"agreement": first / max(1, n), "accepted": acc_sum / max(1, n)}


def train(model_dir: str, out: str, data: list[str], minutes: float | None, device: str = "cpu", seed: int = 0,
          intermediate: int | None = None, batch: int = 16, lr: float = 3e-3, k: int = 4, gen_rows: int = 4096,
          val_rows: int = 32, eval_every: int = 25, patience: int = 6, progress: bool = True, ce_frac: float = 0.25,
          command: str | None = None, init: str | None = None, max_steps: int = 100_000,
          vocab_keep: int = 1024) -> dict:
    """Train on the shared loop (dgopt/training/trainer.py: warm-up + cosine LR fitted to `minutes`, early stopping,
    best checkpoint); validation = the chain's mean accepted length at k (higher is better)."""
    import torch

    from . import trainer as T
    t_start = time.time()
    T.set_seeds(seed)
    gen = torch.Generator().manual_seed(seed)
    target, tdir = _load_target(model_dir, device)
    cfg = target.config
    vocab, bos = int(target.get_output_embeddings().weight.shape[0]), int(cfg.bos_token_id or 0)
    H = int(cfg.hidden_size)
    frozen = R.Frozen(target)
    module = R.new_module(H, intermediate or 2 * H, float(getattr(cfg, "rms_norm_eps", 1e-5)), seed).to(device)
    if init:    # continue a module trained for this target (a longer run in several sittings)
        module, icfg = R.load(Path(init), "--init")
        R.check_target(icfg, target, str(model_dir), Path(init), "--init")
        module = module.train().to(device)

    self_data = list(data) == ["self"]
    train_s, val_s = (None, None) if self_data else _corpus_streams(list(data), tdir)
    say = print if progress else (lambda *a, **k: None)
    vgen = torch.Generator().manual_seed(seed + 1_000_003)
    say(f"the target writes {gen_rows} training + {val_rows} validation rows of {PROMPT + NEW} tokens ...", flush=True)
    t_gen = time.time()
    half = gen_rows // 2     # half greedy (what greedy decoding verifies), half sampled (diversity)
    prompts = (None, None, None) if self_data else \
        (_windows(train_s, half, PROMPT, gen), _windows(train_s, gen_rows - half, PROMPT, gen),
         _windows(val_s, val_rows, PROMPT, vgen))
    rows = torch.cat([_sample_rows(target, half, gen, device, vocab, bos, True, prompts[0]),
                      _sample_rows(target, gen_rows - half, gen, device, vocab, bos, False, prompts[1])])
    val = _sample_rows(target, val_rows, vgen, device, vocab, bos, True, prompts[2])
    gen_s = time.time() - t_gen
    say(f"  {gen_s:.0f} s", flush=True)
    draft_vocab = top_tokens(rows[:, PROMPT:], vocab, vocab_keep)

    def batches(step):
        return rows[torch.randint(0, len(rows), (batch,), generator=gen)].to(device)

    def loss_fn(m, x):
        hn, logp = _teacher(target, x)
        return chain_loss(m, frozen, x, hn, logp, gen, ce_frac)

    first = evaluate(module, frozen, target, val, k)
    res = T.train(module, batches, loss_fn, lambda m: -evaluate(m, frozen, target, val, k)["accepted"],
                  max_steps=max_steps, lr=lr, minutes=minutes, started=t_start, reserve_s=15.0, patience=patience,
                  eval_every=eval_every, warmup_steps=20, weight_decay=0.0, label="recycle",
                  intro=f"before training: agreement {first['agreement']:.3f}, accepted@{k} {first['accepted']:.3f}",
                  loss_name="chain loss", describe_val=lambda v: f"accepted@{k} {-v:.3f}", progress=progress)
    final = evaluate(module, frozen, target, val, k)
    info = {
        "seed": seed, "data": list(data), "device": device, "steps": res.steps_done, "stopped": res.stopped,
        "best_step": res.best_step, "unroll": UNROLL, "batch": batch, "seq_len": PROMPT + NEW, "lr": lr, "minutes": minutes,
        "gen_rows": gen_rows, "gen_s": round(gen_s, 1), "val_rows": val_rows, "ce_frac": ce_frac,
        "val_agreement": round(final["agreement"], 4), f"val_accepted_at_{k}": round(final["accepted"], 4),
        "val_tokens_per_forward_at_k": round(1 + final["accepted"], 4), "k": k,
        "evals": [[s, round(-v, 4)] for s, v in res.evals],
        "last_train_loss": round(res.losses[-1], 4) if res.losses else None,
        "train_wall_s": round(res.train_wall_s, 1), "total_wall_s": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(), "init": init, "command": command or "",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
    }
    info["draft_vocab_coverage"] = round(float(torch.isin(val[:, PROMPT:], torch.tensor(draft_vocab)).float().mean()),
                                         4) if draft_vocab else 1.0
    R.save(module.cpu(), Path(out), str(model_dir), R.target_hash(target.cpu()),
           {"draft_vocab": draft_vocab, "training": info} if draft_vocab else {"training": info})
    say(f"saved {out}: agreement {final['agreement']:.3f}, accepted@{k} {final['accepted']:.3f} "
        f"(~{1 + final['accepted']:.2f} tokens per target forward), {res.steps_done} steps, {res.stopped}",
        flush=True)
    return info


#: Shipped modules: `dgopt models build NAME` runs `dgopt train recycle` with these arguments (into the user cache
#: unless --out); the committed code-tiny-recycle is this recipe's output on the 2-core machine (its recycle.json).
RECIPES = {
    "code-tiny-recycle": {"model_dir": "code-tiny", "data": ["stdlib"], "minutes": 40.0, "seed": 0, "batch": 4,
                          "lr": 3e-3, "eval_every": 250, "val_rows": 32, "patience": 8, "gen_rows": 4096},
}


def build(name: str, out: str | None = None, device: str = "cpu", seed: int | None = None) -> Path:
    from .trainer import cache_dir
    r = dict(RECIPES[name])
    if seed is not None:
        r["seed"] = seed
    dest = Path(out) if out else cache_dir(name)
    cmd = f"dgopt models build {name}" + (f" --out {out}" if out else "") + (f" --seed {seed}" if seed else "")
    train(r.pop("model_dir"), str(dest), r.pop("data"), r.pop("minutes"), device, command=cmd, **r)
    return dest


HELP = "a recyclable module for strategy recycle (RecycleGPT / EAGLE-style draft head on a frozen target)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of its own; MODEL_DIR, -o, --data, --minutes, --max-steps, --lr, --device, --seed, --threads and
    --no-progress are the shared ones (dgopt/training/cli.py)."""
    p.add_argument("--init", default=None, help="continue training this module dir (trained for the same target)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2 x hidden)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gen-rows", type=int, default=4096, help="training rows the target writes (continuing prompts of the "
                   "--data text, or its own for self)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--val-rows", type=int, default=32)
    p.add_argument("--patience", type=int, default=6, help="evaluations without gain before stopping (0: off)")
    p.add_argument("--draft-vocab", type=int, default=1024, help="the chain proposes only the N tokens the target "
                   "writes most often in the training rows (its LM head reads N columns; 0: the whole vocabulary)")


def run(a, common) -> int:
    import torch
    torch.set_num_threads(common.threads)
    if "self" in common.data and len(common.data) > 1:
        raise ModelError("--data: 'self' cannot be combined with other data")
    if a.draft_vocab < 0:
        raise ModelError(f"--draft-vocab {a.draft_vocab}: must be >= 0 (0: the whole vocabulary)")
    if a.gen_rows < 2 or a.val_rows < 1 or a.batch < 1:
        raise ModelError("--gen-rows must be >= 2, --val-rows and --batch >= 1")
    train(str(common.model_dir), str(common.out), list(common.data), common.minutes or 20.0, common.device,
          common.seed, a.intermediate, a.batch, lr=common.lr or 3e-3, gen_rows=a.gen_rows, val_rows=a.val_rows,
          eval_every=a.eval_every, patience=a.patience, progress=common.progress, command=common.command,
          init=a.init, max_steps=common.max_steps or 100_000, vocab_keep=a.draft_vocab)
    return 0
