"""``dgopt train lm``: fine-tune a causal LM on text with next-token cross-entropy.

The plainest use of the shared trainer, and the pattern for the other ``dgopt train`` subcommands: read the common
options, build the data, hand a batch provider, a loss and a validation function to
:func:`dgopt.training.trainer.train`, write the best checkpoint and its card. ``--data self`` trains on the model's
own greedy continuations of stdlib windows (and validates on held-out ones).
"""

from __future__ import annotations

import json
import platform
import time

HELP = "fine-tune a causal LM on text (next-token cross-entropy); keeps the checkpoint with the best held-out loss"


def add_arguments(p) -> None:
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (default 50)")
    p.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")
    p.add_argument("--generations", type=int, default=256,
                   help="--data self: continuations to generate (default 256, an eighth more held out)")


def run(a, c) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..errors import DgoptError
    from ..models.tokenizers_train import tokenizer_fingerprint
    from . import distill
    from .build import save_model, staged, versions
    from .data import encode_stream, eval_windows, mean_loss, random_windows, source_files, split_stream
    from .trainer import BUILD_INFO, Progress, set_seeds, train

    t_start = time.time()
    for name in ("seq_len", "batch_size", "eval_every", "generations"):
        if getattr(a, name) < 1:
            raise DgoptError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if c.device == "cpu" and c.threads:
        torch.set_num_threads(c.threads)
    dev = torch.device(c.device)
    try:
        tok = AutoTokenizer.from_pretrained(str(c.model_dir))
    except (OSError, ValueError):
        raise DgoptError(f"MODEL_DIR {c.model_dir}: has no tokenizer files; dgopt train needs one to read text") \
            from None
    set_seeds(c.seed)
    model = AutoModelForCausalLM.from_pretrained(str(c.model_dir), dtype=torch.float32).to(dev)
    L = min(a.seq_len, getattr(model.config, "max_position_embeddings", a.seq_len))

    train_files, val_files = source_files(c.data)
    empty = torch.empty(0, dtype=torch.int32)
    train_stream = encode_stream(tok, train_files) if train_files else empty
    val_stream = encode_stream(tok, val_files) if val_files else empty
    train_stream, val_stream = split_stream(train_stream, val_stream, 4 * L)
    generated = held_out = None
    if "self" in c.data:
        # prompts: the training text, else a fixed 1 MB slice of the stdlib (windows are drawn, not the whole)
        prompts = train_stream if len(train_stream) else encode_stream(tok, source_files(["stdlib"], 1 << 20)[0])
        hold = max(4, a.generations // 8)
        n = a.generations + hold
        bar = Progress(c.progress, n, "self generations")
        try:
            rows = distill.teacher_generations(model.eval(), prompts, n, torch.Generator().manual_seed(c.seed + 1),
                                               dev, bar)
        finally:
            bar.close()
        generated, held_out = rows[hold:], rows[:hold]
    if len(train_stream) <= L + 1 and generated is None:
        raise DgoptError(f"--data {' '.join(c.data)}: {len(train_stream)} tokens of training text, fewer than one "
                         f"window of {L}")
    if held_out is None and len(val_stream) <= L:
        raise DgoptError(f"--data {' '.join(c.data)}: too little text to hold out a validation split "
                         f"({len(train_stream) + len(val_stream)} tokens; windows of {L})")
    val = held_out if held_out is not None and len(val_stream) <= L else eval_windows(val_stream, L, 32768)
    gen = torch.Generator().manual_seed(c.seed)

    def batches(step):
        if generated is not None and (step % 2 == 0 or len(train_stream) <= L + 1):
            return generated[torch.randint(0, len(generated), (a.batch_size,), generator=gen)].to(dev)
        return random_windows(train_stream, a.batch_size, L, gen).to(dev)

    def loss_fn(model, x):
        return model(input_ids=x, labels=x, use_cache=False).loss

    def validate(model):
        return mean_loss(model, val, dev, a.batch_size)

    before = mean_loss(model, val, dev, a.batch_size)
    res = train(model, batches, loss_fn, validate, max_steps=c.max_steps or 1000, lr=c.lr or 1e-4,
                minutes=c.minutes, started=t_start, reserve_s=min(30.0, (c.minutes or 0) * 6),
                seed=c.seed, patience=a.patience, eval_every=a.eval_every, warmup_steps=20, label="train lm",
                intro=f"train lm: {c.model_dir} on {' '.join(c.data)}: {len(train_stream):,} train tokens, "
                      f"{len(val)} validation windows of {val.shape[1]}, held-out loss {before:.3f}",
                progress=c.progress)
    card = {
        "kind": "train lm", "base_model": str(c.model_dir), "train_files": len(train_files),
        "val_files": len(val_files), "train_tokens": int(len(train_stream)),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok), "data": list(c.data), "seed": c.seed,
        "steps_done": res.steps_done, "stopped": res.stopped, "best_step": res.best_step,
        "val_loss_before": round(before, 5), "val_loss": round(res.best_val, 5),
        "evals": [[s, round(v, 5)] for s, v in res.evals], "train_wall_s": round(res.train_wall_s, 1),
        "corpus": {"python": platform.python_version()} if "stdlib" in c.data or "self" in c.data else {},
        "command": c.command, "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with staged(c.out) as out:
        save_model(model, tok, out, "float32", own_tokenizer=False)
        (out / BUILD_INFO).write_text(json.dumps(card, indent=2) + "\n")
    if c.progress:
        print(f"held-out loss {before:.4f} -> {res.best_val:.4f} (best at step {res.best_step} of "
              f"{res.steps_done}; {res.stopped})")
    print(c.out)
    return 0
