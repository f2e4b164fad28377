"""Build a model from its recipe: corpus and tokenizer, model (fresh, or from ``init_from``), distillation data,
the shared training loop, final evaluation, and the model directory with its card.

A built model directory holds ``config.json``, ``model.safetensors`` (float16 weights; ``config.json`` says
``"dtype": "float32"`` so a plain ``from_pretrained`` upcasts them to float32, the fast dtype on CPUs),
``generation_config.json``, the tokenizer files and ``dgopt_build.json`` (recipe, seed, steps, command,
validation loss/perplexity, unigram baseline, wall time, corpus and library versions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any, Callable

from ..models import corpus as _corpus
from ..models import tokenizers_train as _tok
from . import distill
from .data import encode_stream, eval_windows, mean_loss, recipe_batch, unigram_ppl
from .recipes import RECIPES, Recipe, recipe_dict
from .trainer import BUILD_INFO, Progress, cache_dir, model_dir, resolve_built, set_seeds, train


def check_pairs(recipe: Recipe, tok, me: tuple[str, str, str]) -> None:
    """Refuse a build whose tokenizer has the name and vocabulary of a built partner's (``recipe.pairs_with``: its
    drafts or targets) but other ids."""
    for partner in recipe.pairs_with:
        try:
            model_dir(partner)
        except FileNotFoundError:       # not built: nothing to disagree with yet
            continue
        distill.same_tokenizer(partner, tok, me, "recipe.pairs_with")


def _load_models(recipe: Recipe, tok, me: tuple[str, str, str], dev):
    """The model to train (seeded init, or ``init_from``'s weights) and the teacher, if any, with ``cross`` =
    (student tokenizer, teacher tokenizer) when the teacher's tokenizer is another."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM(recipe.llama_config(len(tok))).to(dev)
    if recipe.init_from:
        init = distill.load_built(recipe.init_from, tok, me, "init_from", dev)
        try:
            model.load_state_dict(init.state_dict())
        except RuntimeError as e:
            raise ValueError(f"recipe.init_from: {recipe.init_from} has another architecture: "
                             f"{str(e).splitlines()[0]}") from None
        del init
    teacher = cross = None
    if recipe.teacher and not distill.same_tokenizer(recipe.teacher, tok, me, "recipe.teacher"):
        if not recipe.teacher_generated:
            raise ValueError(f"recipe.teacher: {recipe.teacher} was trained with another tokenizer than this "
                             "recipe's; distil across tokenizers from its generated text (recipe.teacher_generated)")
        tdir = resolve_built(recipe.teacher)
        teacher = LlamaForCausalLM.from_pretrained(str(tdir), dtype="float32").to(dev).eval()
        cross = (tok, AutoTokenizer.from_pretrained(str(tdir)))
    elif recipe.teacher:
        teacher = distill.load_built(recipe.teacher, tok, me, "teacher", dev).eval()
    return model, teacher, cross


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

    The tokenizer is the shipped asset (``dgopt/assets/tokenizers``); ``vocab_size`` (tests) trains one of that
    size instead, on the corpus slice.  ``limit_bytes`` trains on a deterministic slice of the corpus (tests, smoke
    runs).  Returns the build info that is also written to ``dgopt_build.json`` (it additionally holds
    ``"losses"``, the per-step training losses).
    """
    import torch

    t_start = time.time()
    say = log or (lambda m: None)
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    total_steps = int(steps if steps is not None else recipe.steps)
    dev = torch.device(device)

    # ---- corpus and tokenizer -------------------------------------------
    train_files, val_files = _corpus.split_files(recipe.corpus, limit_bytes=limit_bytes)
    tok_spec = _tok.TOKENIZERS[recipe.tokenizer]
    if tok_spec.corpus == recipe.corpus:
        tok_files = train_files
    else:
        tok_files, _ = _corpus.split_files(tok_spec.corpus, limit_bytes=limit_bytes)
    # the shipped tokenizer, so that a build on another Python keeps the ids its drafts / targets were trained on
    tok, tok_source = _tok.recipe_tokenizer(recipe.tokenizer, tok_files, vocab_size)
    me = (recipe.name, recipe.tokenizer, tok_source["corpus_python"])
    check_pairs(recipe, tok, me)
    vocab = len(tok)
    train_stream = encode_stream(tok, train_files)
    val_stream = encode_stream(tok, val_files)
    t_data = time.time() - t_start

    # ---- model, teacher, generations ------------------------------------
    set_seeds(seed)
    model, teacher, cross = _load_models(recipe, tok, me, dev)
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
        n_gen, t_gen = recipe.teacher_generated + distill.GEN_HELD_OUT, time.time()
        gbar = Progress(progress, n_gen, f"{recipe.name}: teacher generations")
        gbar.log(f"{recipe.name}: {n_gen} greedy continuations by {recipe.teacher} ({distill.GEN_NEW} tokens each, "
                 f"{distill.GEN_HELD_OUT} held out)")
        try:
            all_gen = distill.teacher_generations(teacher, train_stream, n_gen,
                                                  torch.Generator().manual_seed(seed + 1), dev, gbar, cross)
        finally:
            gbar.close()
        say(f"teacher_generations={n_gen} seconds={time.time() - t_gen:.0f}")
        generated, held_out = all_gen[distill.GEN_HELD_OUT:], all_gen[:distill.GEN_HELD_OUT]
    n_params = sum(p.numel() for p in model.parameters())

    eval_len = min(recipe.long_seq_len or recipe.seq_len, recipe.max_position_embeddings)
    eval_len = max(recipe.seq_len, eval_len)
    periodic = eval_windows(val_stream, eval_len, recipe.eval_tokens)
    full = eval_windows(val_stream, eval_len)
    eval_rows = max(1, (recipe.batch_size * recipe.seq_len) // eval_len)
    gen = torch.Generator().manual_seed(seed)

    intro = (f"{recipe.name}: {n_params/1e6:.2f} M params, vocab {vocab}, "
             f"train {len(train_stream):,} tokens ({len(train_files)} files), "
             f"val {len(val_stream):,} tokens ({len(val_files)} files), data {t_data:.1f}s")
    say(f"params={n_params} vocab={vocab} train_tokens={len(train_stream)} val_tokens={len(val_stream)}")

    # ---- training ---------------------------------------------------------
    def batches(step):
        x = recipe_batch(step, recipe, train_stream, generated, gen).to(dev, non_blocking=True)
        return x, generated is not None and step % recipe.generated_every == 0

    def loss_fn(model, batch):
        x, on_generated = batch
        if not kl or (recipe.hard_labels and on_generated):
            return model(input_ids=x, labels=x, use_cache=False).loss
        return distill.kl_to_teacher(model, teacher, x)

    def validate(model):
        if held_out is not None and cross is None:      # a draft is selected for agreeing on its target's text
            return 1.0 - distill.teacher_agreement(model, teacher, held_out, dev, eval_rows)
        if held_out is not None:                        # ... or, across tokenizers, for predicting it
            return mean_loss(model, held_out, dev, eval_rows)
        return mean_loss(model, periodic, dev, eval_rows)

    describe = ((lambda v: f"held-out disagreement {v:.3f}") if held_out is not None and kl else
                (lambda v: f"held-out generations CE {v:.3f}") if held_out is not None else
                (lambda v: f"val CE {v:.3f} (ppl {math.exp(v):.1f})"))
    res = train(
        model, batches, loss_fn, validate, max_steps=total_steps, lr=recipe.lr,
        minutes=recipe.time_limit_s / 60 if recipe.time_limit_s else None, started=t_start,
        reserve_s=recipe.time_reserve_s, patience=recipe.patience, eval_every=recipe.eval_every,
        warmup_steps=recipe.warmup_steps, min_lr_ratio=recipe.min_lr_ratio, weight_decay=recipe.weight_decay,
        betas=recipe.betas, grad_clip=recipe.grad_clip, label=recipe.name, intro=intro,
        loss_name=loss_kind.replace("_to_teacher", ""), describe_val=describe, progress=progress, log=log,
    )

    # ---- final evaluation on the whole validation split -------------------
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        val_loss = mean_loss(model, full, dev, eval_rows)
    agreement = distill.teacher_agreement(model, teacher, periodic, dev, eval_rows) if kl else None
    gen_agreement = distill.teacher_agreement(model, teacher, held_out, dev, eval_rows) \
        if kl and held_out is not None else None
    gen_loss = mean_loss(model, held_out, dev, eval_rows) if held_out is not None else None

    save_model(model, tok, Path(out), recipe.save_dtype)
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
    losses = res.losses
    info = {
        "name": recipe.name,
        "description": recipe.description,
        "recipe": recipe_dict(recipe),
        "params": int(n_params),
        "vocab_size": int(vocab),
        "tokenizer": recipe.tokenizer,
        "tokenizer_fingerprint": _tok.tokenizer_fingerprint(tok),
        "tokenizer_source": tok_source,     # asset or trained here, and the Python of the stdlib it was trained on
        "corpus_python": platform.python_version(),     # the stdlib this model trained on (corpus.python too)
        "seed": seed,
        "device": str(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "steps": total_steps,
        "steps_done": res.steps_done,
        "stopped": res.stopped,
        "schedule_time_adjusted": res.time_adjusted,
        "best_step": res.best_step,
        "tokens_seen": int(res.steps_done * recipe.batch_size * recipe.seq_len),
        "val_loss": round(val_loss, 5),
        "val_ppl": round(math.exp(val_loss), 3),
        "unigram_ppl": round(unigram_ppl(train_stream, full[:, 1:], vocab), 3),
        "teacher_agreement": None if agreement is None else round(agreement, 4),
        "train_loss_kind": loss_kind,
        "teacher_generated_agreement": None if gen_agreement is None else round(gen_agreement, 4),
        "teacher_generated_loss": None if gen_loss is None else round(gen_loss, 5),
        "evals_metric": ("teacher_disagreement_on_generations" if kl else "cross_entropy_on_generations")
        if held_out is not None else "val_cross_entropy",
        "val_eval": {"windows": int(full.shape[0]), "window_len": int(full.shape[1])},
        "evals": [[s, round(v, 5)] for s, v in res.evals],
        "train_loss_first": round(losses[0], 5) if losses else None,
        "train_loss_last20": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5),
        "train_wall_s": round(res.train_wall_s, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "command": command,
        "corpus": corpus_info,
        "weights_dtype": recipe.save_dtype,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (Path(out) / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    info["losses"] = losses
    return info


def versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def save_model(model, tok, out: Path, save_dtype: str = "float16", own_tokenizer: bool = True) -> None:
    """Weights in ``save_dtype`` (loading as float32 by default: fast on CPUs), generation config, tokenizer.
    ``own_tokenizer``: dgopt's tokenizer and generation config (else the model's and the tokenizer's own)."""
    import torch
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").to(getattr(torch, save_dtype))
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True
    model.config.use_cache = True
    model.save_pretrained(str(out), **save_kwargs)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if own_tokenizer:
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(str(out))
    elif model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    _tok.save_tokenizer(tok, out)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    if not own_tokenizer:
        return
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # portable across transformers 4.x/5.x
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def staged(out_dir: Path):
    """A staging dir beside ``out_dir``, swapped in when the block ends without an error: an interrupted or failed
    build never leaves a half-written model where a complete one (e.g. a committed asset) was."""
    import shutil
    import tempfile

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        yield staging
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
        command = shlex.join(["dgopt", "models", "build", name] + (["--out", str(out)] if out is not None else [])
                             + (["--steps", str(steps)] if steps is not None else [])
                             + (["--device", device] if device != "cpu" else [])
                             + (["--seed", str(seed)] if seed else [])
                             + (["--corpus-limit", str(limit_bytes)] if limit_bytes is not None else []))
    with staged(out_dir) as staging:
        info = train_recipe(recipe, staging, steps=steps, device=device, seed=seed, progress=progress,
                            limit_bytes=limit_bytes, command=command, threads=threads)
    if progress:
        from rich.console import Console

        Console().print(
            f"{info['name']}: {info['params']/1e6:.2f} M params, {info['steps_done']} steps "
            f"(best at {info['best_step']}), {info['train_wall_s']:.0f}s training\n"
            f"  validation loss {info['val_loss']:.4f}  ppl {info['val_ppl']:.2f}  "
            f"(unigram baseline ppl {info['unigram_ppl']:.2f})\n"
            f"  saved to {out_dir}"
        )
    return out_dir
