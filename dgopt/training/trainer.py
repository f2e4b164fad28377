"""The one training loop of dgopt, its progress display, and the cache of built models.

Every model dgopt trains goes through :func:`train`: the recipe builds (``dgopt models build``, see
:mod:`dgopt.training.build`) and each ``dgopt train`` subcommand. It owns what they share, so a new kind of training
writes only its data and its loss::

    from dgopt.training.trainer import train, set_seeds

    set_seeds(seed)                                   # before building the model, so its init is fixed too
    result = train(
        model,                                        # the module whose weights train (a frozen target stays outside)
        batches=lambda step: next_batch(step),        # the batch of step `step` (anything loss_fn takes)
        loss_fn=lambda model, batch: loss,            # a scalar tensor to minimise
        validate=lambda model: val_loss,              # a float, lower is better: selects the checkpoint
        max_steps=2000, minutes=10, lr=1e-3, seed=seed, patience=4, label="recycle",
    )
    result.best_state, result.best_step, result.best_val    # the model already holds best_state on return
    result.losses, result.evals, result.stopped             # history: per-step train loss, (step, val), why it ended

What :func:`train` does, in order, each step: the learning rate (linear warm-up over ``warmup_steps``, then cosine
down to ``min_lr_ratio * lr`` at ``max_steps``; with a time budget the schedule runs on whichever is further along,
steps or wall time, so a slow machine anneals and stops in time instead of overrunning), the batch, ``loss_fn``
under bf16 autocast on CUDA, AdamW over ``groups`` (default :func:`param_groups`: the parameters that require
grad, weight decay on matrices except embeddings), gradient clipping at ``grad_clip``; every ``eval_every`` steps and at the end ``validate`` and the checkpoint
kept if it is the best so far; it stops early after ``patience`` evaluations without improvement (0: never), at
``max_steps`` or at the time budget (``minutes`` from ``started``, less ``reserve_s`` kept for the caller's own
evaluation and saving). ``validate`` and ``loss_fn`` get the model in train mode; switch to eval inside if needed.
``seed`` re-seeds python, numpy and torch before the first step. One :class:`Progress` display (a rich bar on a
terminal, plain lines in a log) shows every run, with one line per evaluation; ``intro`` is printed above it and
``log`` gets a machine-readable line per evaluation.

Param groups may carry ``"lr_scale"`` (a multiplier on the scheduled rate, e.g. a smaller rate for a fine-tuned
body than for a fresh head). ``best_state`` is ``model.state_dict()`` (on the CPU): a frozen part held as a
submodule is in it too; keep a large frozen target outside ``model`` (in the closures) instead.

A ``dgopt train`` subcommand (its options, data and card) is a module registered in one line in
:data:`dgopt.training.cli.TRAIN_COMMANDS`; :mod:`dgopt.training.finetune` (``dgopt train lm``) is the example.

Built models live in the package's assets (``dgopt/assets/models/NAME``, committed) or in the user cache
(``$DGOPT_CACHE/models/NAME``, default ``~/.cache/dgopt``): :func:`model_dir` finds one, :func:`list_models` lists
the recipes and where each is.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .recipes import RECIPES

#: Where committed model assets live inside the package.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"

BUILD_INFO = "dgopt_build.json"


# --------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns; ``model`` already holds ``best_state``."""

    best_state: dict
    best_step: int
    best_val: float
    losses: list[float] = field(default_factory=list)   # train loss of every step
    evals: list[tuple[int, float]] = field(default_factory=list)   # (steps done, validation value)
    stopped: str = "steps"              # "steps", "early stop at step ...", "time budget ... reached ..."
    time_adjusted: bool = False         # the LR schedule ran on wall time at some point
    train_wall_s: float = 0.0

    @property
    def steps_done(self) -> int:
        return len(self.losses)


def set_seeds(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: float, lr: float, warmup_steps: int, min_lr_ratio: float, total: int) -> float:
    """Linear warm-up, then cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``total``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total - warmup_steps)
    t = min(1.0, t)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on embeddings, norms and biases (trainable parameters only)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train(
    model,
    batches: Callable[[int], Any],
    loss_fn: Callable[[Any, Any], Any],
    validate: Callable[[Any], float],
    *,
    max_steps: int,
    lr: float,
    minutes: float | None = None,
    started: float | None = None,
    reserve_s: float = 0.0,
    seed: int | None = None,
    patience: int = 0,
    eval_every: int = 100,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    grad_clip: float = 1.0,
    groups: list[dict] | None = None,
    label: str = "train",
    intro: str | None = None,
    loss_name: str = "loss",
    describe_val: Callable[[float], str] = lambda v: f"val {v:.3f}",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``model`` (see the module docstring) and return the best checkpoint and the history."""
    import torch

    say = log or (lambda m: None)
    dev = next(model.parameters()).device
    if seed is not None:
        set_seeds(seed)
    model.train()
    opt = torch.optim.AdamW(groups or param_groups(model, weight_decay), lr=lr, betas=betas,
                            fused=dev.type == "cuda")
    trained = [p for p in model.parameters() if p.requires_grad]
    use_amp = dev.type == "cuda"
    amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)  # noqa: E731

    res = TrainResult(best_state={}, best_step=-1, best_val=float("inf"))
    bad_evals = 0
    t_train = time.time()
    deadline = None
    if minutes:
        deadline = (started if started is not None else t_train) + minutes * 60 - reserve_s

    def do_eval(step_done: int) -> float:
        nonlocal bad_evals
        with amp():
            v = validate(model)
        res.evals.append((step_done, v))
        if v < res.best_val:
            res.best_val, res.best_step, bad_evals = v, step_done, 0
            res.best_state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
        else:
            bad_evals += 1
        return v

    bar = Progress(progress, max_steps, label)
    if intro:
        bar.log(intro)
    try:
        for step in range(max_steps):
            sched_step: float = step
            if deadline is not None:
                frac_time = (time.time() - t_train) / max(1e-9, deadline - t_train)
                if frac_time * max_steps > step:
                    sched_step, res.time_adjusted = frac_time * max_steps, True
                if sched_step >= max_steps:
                    res.stopped = f"time budget {minutes * 60:.0f}s reached after {step} steps"
                    if not res.evals or res.evals[-1][0] != step:
                        do_eval(step)
                    break
            for g in opt.param_groups:
                g["lr"] = lr_at(sched_step, lr, warmup_steps, min_lr_ratio, max_steps) * g.get("lr_scale", 1.0)
            batch = batches(step)
            with amp():
                loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, grad_clip)
            opt.step()
            lv = loss.item()
            res.losses.append(lv)
            done = step + 1
            val = None
            if done % eval_every == 0 or done == max_steps:
                val = do_eval(done)
                el = time.time() - t_train
                bar.log(f"step {done:>5}/{max_steps}  train {loss_name} {lv:.3f}  {describe_val(val)}  "
                        f"{el/done:.2f}s/step")
                say(f"step={done} train_loss={lv:.4f} val_loss={val:.4f} elapsed={el:.0f}s")
            recent = res.losses[-20:]
            bar.update(done, loss=sum(recent) / len(recent), val=val)
            if val is not None and patience and bad_evals >= patience:
                res.stopped = f"early stop at step {done} (no val improvement in {patience} evals)"
                break
    finally:
        bar.close()
    res.train_wall_s = time.time() - t_train
    if not res.best_state:
        do_eval(res.steps_done)
    model.load_state_dict(res.best_state)
    return res


# --------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------


class Progress:
    """Rich progress bar on a terminal, a plain line every few steps in a log file, nothing when disabled."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled = enabled
        self.bar = None
        self.plain = False
        if not enabled:
            return
        if not sys.stderr.isatty() and not sys.stdout.isatty():
            self.plain = True
            self.total, self.label, self.t0 = total, label, time.time()
            self.every = max(1, min(25, total // 20))
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
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
            print(f"{self.label} {step}/{self.total} loss {loss:.3f} {el:.0f}s elapsed {el/max(1, step):.2f}s/step",
                  flush=True)
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


# --------------------------------------------------------------------------
# the cache of built models
# --------------------------------------------------------------------------


def cache_root() -> Path:
    """``$DGOPT_CACHE`` if set, else ``~/.cache/dgopt``."""
    env = os.environ.get("DGOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dgopt"


def cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def asset_dir(name: str) -> Path:
    return ASSETS_DIR / name


def is_built(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def model_dir(name: str) -> Path:
    """Directory of built model ``name``: committed asset first, then user cache."""
    for d in (asset_dir(name), cache_dir(name)):
        if is_built(d):
            return d
    known = "" if name in RECIPES else f" (unknown model; known: {', '.join(RECIPES)})"
    raise FileNotFoundError(f"model {name!r} is not built{known}; build it with: dgopt models build {name}")


def resolve_built(ref: str) -> Path:
    """A built model's dir from a recipe name or a path."""
    p = Path(ref)
    return p if (p / "config.json").is_file() else model_dir(ref)


def build_info(ref: str | Path) -> dict:
    """A built model's card (``dgopt_build.json``), ``{}`` when it has none."""
    try:
        return json.loads((resolve_built(str(ref)) / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return {}


def list_models() -> list[dict]:
    rows = []
    for name, r in RECIPES.items():
        where, path, info = "missing", None, {}
        for kind, d in (("asset", asset_dir(name)), ("cache", cache_dir(name))):
            if is_built(d):
                where, path, info = kind, d, build_info(d)
                break
        rows.append({
            "name": name,
            "description": r.description,
            "tokenizer": r.tokenizer,
            "params": info.get("params", r.approx_params()),
            "where": where,
            "path": str(path) if path else None,
            "val_ppl": info.get("val_ppl"),
            "unigram_ppl": info.get("unigram_ppl"),
        })
    return rows
