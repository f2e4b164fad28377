"""``dgopt models list|build`` and the ``dgopt train`` command group.

A ``dgopt train`` subcommand is a module with ``HELP`` (one line), ``add_arguments(parser)`` (its own options) and
``run(args, common) -> int``; it registers with one line in :data:`TRAIN_COMMANDS` (the module is imported to
build the parser, so keep torch and transformers imports inside ``run``). The options every subcommand shares are
parsed and checked once here into :class:`Common`:

    dgopt train KIND MODEL_DIR -o OUT [--data self|stdlib|PATH ...] [--minutes M] [--max-steps N] [--lr LR]
                     [--device cpu|cuda] [--seed S] [--threads T] [--no-progress]

MODEL_DIR is a model directory or the name of a built model (``code-tiny``); OUT must not exist yet or be a
directory the subcommand may replace (it is written atomically). ``--data``: ``stdlib`` (the running Python's
standard library, the corpus the shipped models trained on), ``self`` (the model's own greedy continuations of
stdlib windows: the text it will be asked to continue), or files / directories of text.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import DgoptError

#: name -> module implementing the subcommand (HELP, add_arguments(parser), run(args, common) -> int)
TRAIN_COMMANDS: dict[str, str] = {
    "lm": "dgopt.training.finetune",
    "recycle": "dgopt.training.recycle",
    "consistency": "dgopt.training.consistency",
}


@dataclass(frozen=True)
class Common:
    """The options every ``dgopt train`` subcommand shares, checked."""

    model_dir: Path
    out: Path
    data: tuple[str, ...]
    minutes: float | None
    max_steps: int | None
    lr: float | None
    device: str
    seed: int
    threads: int
    progress: bool
    command: str


def _common_parser() -> argparse.ArgumentParser:
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("model_dir", metavar="MODEL_DIR", help="model directory, or the name of a built model (code-tiny)")
    c.add_argument("-o", "--out", required=True, metavar="OUT", help="directory to write (replaced atomically)")
    c.add_argument("--data", nargs="+", default=["stdlib"], metavar="SRC",
                   help="training text: stdlib (default), self (the model's own greedy continuations), "
                        "or files / directories")
    c.add_argument("--minutes", type=float, help="wall-clock budget; the LR schedule anneals to fit it")
    c.add_argument("--max-steps", type=int, help="optimizer steps (default: the subcommand's)")
    c.add_argument("--lr", type=float, help="peak learning rate (default: the subcommand's)")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar or per-eval lines")
    return c


def _check_device(device: str, what: str) -> None:
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise DgoptError(f"{what} --device cuda: no CUDA device here (or torch is the CPU build)")


MODEL_FILES = ("config.json", "dgopt_build.json", "recycle.json")


def check_out(out: Path, option: str, model_dir: Path | None = None) -> None:
    """An output directory is replaced whole when training ends: refuse, before any training, one that holds
    something other than a model (it would be deleted), one that contains MODEL_DIR, or one that cannot be written."""
    o = out.resolve()
    if o.exists() and not o.is_dir():
        raise DgoptError(f"{option} {out}: exists and is not a directory")
    if model_dir is not None and (o == model_dir.resolve() or o in model_dir.resolve().parents):
        raise DgoptError(f"{option} {out}: contains MODEL_DIR {model_dir}; write the trained model elsewhere")
    if o.is_dir() and any(o.iterdir()) and not any((o / f).is_file() for f in MODEL_FILES):
        raise DgoptError(f"{option} {out}: an existing directory that holds no model; it would be replaced as a "
                         "whole: name a new directory (or a model directory to overwrite)")
    up = o.parent
    while not up.exists():
        up = up.parent
    if not up.is_dir() or not os.access(up, os.W_OK):
        raise DgoptError(f"{option} {out}: cannot create it under {up} (not a writable directory)")


def common_options(a) -> Common:
    """Check the shared options: one-line errors naming the option."""
    from .trainer import resolve_built

    try:
        model_dir = resolve_built(a.model_dir)
    except FileNotFoundError:
        raise DgoptError(f"MODEL_DIR {a.model_dir}: not a model directory (no config.json) nor a built model's "
                         "name") from None
    for name in ("minutes", "max_steps", "lr"):
        v = getattr(a, name)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise DgoptError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
    out = Path(a.out)
    check_out(out, "-o", model_dir)
    for src in a.data:
        if src not in ("self", "stdlib") and not Path(src).exists():
            raise DgoptError(f"--data {src}: no such file or directory (or: self, stdlib)")
    _check_device(a.device, f"train {a.train_cmd}")
    cmd = ["dgopt", "train", a.train_cmd, a.model_dir, "-o", a.out, "--data", *a.data, "--device", a.device,
           "--seed", str(a.seed)] + [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("minutes", "max_steps", "lr")
                                     if getattr(a, k) is not None]
    return Common(model_dir=model_dir, out=out, data=tuple(a.data), minutes=a.minutes, max_steps=a.max_steps,
                  lr=a.lr, device=a.device, seed=a.seed, threads=a.threads, progress=not a.no_progress,
                  command=shlex.join(cmd))


def cmd_train(a) -> int:
    mod = importlib.import_module(TRAIN_COMMANDS[a.train_cmd])
    try:
        return mod.run(a, common_options(a))
    except ValueError as e:     # a model or data that does not fit, found while preparing: one line
        raise DgoptError(str(e)) from None
    except OSError as e:        # an unreadable model file, a full disk: one line naming the path
        raise DgoptError(f"train {a.train_cmd}: {e.strerror or e} ({e.filename or a.out})") from None


def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train or fine-tune a model with the shared trainer (one subcommand per kind)",
                       description="Train or fine-tune a model with dgopt's shared trainer (fixed seeds, warm-up + "
                       "cosine LR, early stopping on held-out data, best checkpoint kept). Every KIND takes MODEL_DIR, "
                       "-o OUT, --data self|stdlib|PATH..., --minutes, --max-steps, --lr, --device, --seed; "
                       "`dgopt train KIND -h` for its own options.")
    tsub = t.add_subparsers(dest="train_cmd", required=True, metavar="KIND")
    common = _common_parser()
    for name, path in TRAIN_COMMANDS.items():
        mod = importlib.import_module(path)
        p = tsub.add_parser(name, parents=[common], help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(fn=cmd_train)


# --------------------------------------------------------------------------
# dgopt models list | build
# --------------------------------------------------------------------------


def cmd_models(a) -> int:
    from .recipes import RECIPES
    from .trainer import list_models

    if a.models_cmd == "list":
        print(f"{'name':16s} {'params':>8s}  {'tokenizer':12s} {'val ppl':>8s} {'unigram':>8s}  where")
        for m in list_models():
            where = m["path"] if m["path"] else f"missing: dgopt models build {m['name']}"
            print(f"{m['name']:16s} {m['params'] / 1e6:6.2f} M  {m['tokenizer']:12s} {m['val_ppl'] or '-':>8} "
                  f"{m['unigram_ppl'] or '-':>8}  {where}")
        return 0
    if a.out:
        check_out(Path(a.out), "--out")
    from . import recycle
    if a.name in recycle.RECIPES:     # a recyclable module (strategy recycle), not a model
        _check_device(a.device, "models build")
        print(recycle.build(a.name, a.out, a.device, a.seed or None))
        return 0
    from . import consistency
    if a.name in consistency.RECIPES:      # consistency-trained: fine-tuned from its base (a step count)
        cmd = ["dgopt", "models", "build", a.name] + (["--out", a.out] if a.out else []) + \
            (["--device", a.device] if a.device != "cpu" else []) + (["--seed", str(a.seed)] if a.seed else [])
        print(consistency.build(a.name, out=a.out, device=a.device, seed=a.seed, command=" ".join(cmd)))
        return 0
    if a.name not in RECIPES:
        raise DgoptError(f"unknown model '{a.name}' (known: {', '.join(RECIPES)})")
    _check_device(a.device, "models build")
    from .build import build_model

    cmd = ["dgopt", "models", "build", a.name] + (["--out", a.out] if a.out else []) + \
        (["--steps", str(a.steps)] if a.steps else []) + (["--device", a.device] if a.device != "cpu" else []) + \
        (["--seed", str(a.seed)] if a.seed else []) + \
        (["--corpus-limit", str(a.corpus_limit)] if a.corpus_limit is not None else [])
    try:
        path = build_model(a.name, out=a.out, steps=a.steps, device=a.device, seed=a.seed, threads=a.threads,
                           limit_bytes=a.corpus_limit, progress=not a.no_progress, command=" ".join(cmd))
    except ValueError as e:     # a recipe's teacher / init_from model that does not fit (tokenizer, architecture)
        raise DgoptError(str(e)) from None
    print(path)
    return 0


def add_models_parser(sub) -> None:
    from .recipes import RECIPES

    m = sub.add_parser("models", help="build or list the project's own locally trained models")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    mb = msub.add_parser("build", help=f"train a model recipe ({', '.join(RECIPES)})")
    mb.add_argument("name")
    mb.add_argument("--out", help="output dir (default: the user cache, ~/.cache/dgopt/models/NAME)")
    mb.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    mb.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    mb.add_argument("--seed", type=int, default=0)
    mb.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    mb.add_argument("--corpus-limit", type=int, metavar="BYTES",
                    help="train on a deterministic slice of about BYTES of source (smoke tests)")
    mb.add_argument("--no-progress", action="store_true")
    mb.set_defaults(fn=cmd_models)
    ml = msub.add_parser("list", help="list recipes and where each model exists")
    ml.set_defaults(fn=cmd_models)
