"""Byte-level BPE tokenizers for dgopt's own code models.

Two tokenizers with different vocabularies (hence different merges) are
trained on the TRAIN split of :mod:`dgopt.models.corpus`:

* ``code-bpe-4k`` -- vocab 4096, shared by ``code-tiny``, ``code-draft`` and
  ``code-small`` (so these can draft for each other token by token);
* ``code-bpe-1k`` -- vocab 1024, used by ``code-draft-xtok`` (a draft model
  whose tokenizer differs from the target's).

Both are byte level: ``decode(encode(text)) == text`` for any string.  Token
id 0 is ``<|endoftext|>``, used as BOS, EOS, PAD and UNK.  Nothing is added
automatically when encoding (no BOS), and decoding does not clean up spaces.
Training is deterministic for a fixed corpus (single-threaded trainer).

The corpus is the running Python's standard library, so a tokenizer trained on
another Python has other merges and other ids under the same name.  The ones
the shipped models use are therefore shipped too, in
``dgopt/assets/tokenizers/NAME`` (``tokenizer.json``, and
``dgopt_tokenizer.json``: vocab, fingerprint, the corpus' Python version), and
:func:`recipe_tokenizer` hands those out; training one is for new tokenizers
(``python -m dgopt.models.tokenizers_train NAME --out DIR``) and for tests.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from . import corpus as _corpus

SPECIAL_TOKEN = "<|endoftext|>"

#: Shipped tokenizers: ``NAME/tokenizer.json`` and ``NAME/dgopt_tokenizer.json``.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"
ASSET_INFO = "dgopt_tokenizer.json"


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    vocab_size: int
    min_frequency: int = 2
    corpus: str = "stdlib"
    description: str = ""


TOKENIZERS: dict[str, TokenizerSpec] = {
    "code-bpe-4k": TokenizerSpec(
        "code-bpe-4k", 4096, description="byte-level BPE, 4096 tokens, stdlib train split"
    ),
    "code-bpe-1k": TokenizerSpec(
        "code-bpe-1k", 1024, description="byte-level BPE, 1024 tokens, stdlib train split"
    ),
}


def _build_raw_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    # The BPE trainer is deterministic when it runs single-threaded; the
    # variable is read when the Rust thread pool is first created, so set it
    # before the first use of `tokenizers` in this process.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap(raw_tokenizer):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
        model_max_length=1024,
    )


def train_tokenizer(
    name: str,
    out_dir: str | os.PathLike | None = None,
    files: Sequence[_corpus.CorpusFile] | None = None,
    limit_bytes: int | None = None,
    vocab_size: int | None = None,
):
    """Train tokenizer ``name`` and return it as a ``PreTrainedTokenizerFast``.

    ``files`` defaults to the train split of the tokenizer's corpus (optionally
    cut to ``limit_bytes``).  ``vocab_size`` overrides the spec (tests).  With
    ``out_dir`` the tokenizer is saved there with ``save_pretrained`` (it then
    loads with ``AutoTokenizer.from_pretrained(out_dir)``).
    """
    spec = TOKENIZERS[name]
    if files is None:
        files, _ = _corpus.split_files(spec.corpus, limit_bytes=limit_bytes)
    raw = _build_raw_tokenizer(
        _corpus.iter_texts(files), vocab_size or spec.vocab_size, spec.min_frequency
    )
    tok = wrap(raw)
    tok.name_or_path = name
    if out_dir is not None:
        save_tokenizer(tok, out_dir)
    return tok


def asset_info(name: str) -> dict | None:
    """The shipped tokenizer ``name``'s card (vocab, fingerprint, corpus_python, ...), None when not shipped."""
    try:
        return json.loads((ASSETS_DIR / name / ASSET_INFO).read_text())
    except (OSError, ValueError):
        return None


def load_tokenizer(name: str):
    """The shipped tokenizer ``name``, wrapped exactly as :func:`train_tokenizer` wraps a trained one."""
    from tokenizers import Tokenizer

    tok = wrap(Tokenizer.from_file(str(ASSETS_DIR / name / "tokenizer.json")))
    tok.name_or_path = name
    return tok


def recipe_tokenizer(name: str, files: Sequence[_corpus.CorpusFile], vocab_size: int | None = None):
    """(tokenizer, where it came from) for a model build: the shipped asset (independent of the running Python),
    or -- with ``vocab_size`` (tests) or for a tokenizer that is not shipped -- one trained on ``files``."""
    import platform

    info = asset_info(name)
    if vocab_size is None and info is not None:
        tok = load_tokenizer(name)
        if tokenizer_fingerprint(tok) != info["fingerprint"]:
            raise ValueError(f"tokenizer asset {name}: tokenizer.json does not match its {ASSET_INFO} fingerprint")
        return tok, {"source": "asset", "path": f"dgopt/assets/tokenizers/{name}",
                     "corpus_python": info["corpus_python"]}
    tok = train_tokenizer(name, files=files, vocab_size=vocab_size)
    return tok, {"source": "trained", "corpus_python": platform.python_version()}


def save_tokenizer(tok, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def tokenizer_fingerprint(tok) -> str:
    """sha256 (16 hex) of the vocabulary and merges: equal iff same tokenization."""
    state = json.loads(tok.backend_tokenizer.to_str())
    model = state["model"]
    payload = json.dumps(
        {"vocab": sorted(model["vocab"].items(), key=lambda kv: kv[1]), "merges": model["merges"]},
        ensure_ascii=True,
    )
    return hashlib.sha256(payload.encode("ascii")).hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dgopt.models.tokenizers_train")
    p.add_argument("name", choices=sorted(TOKENIZERS))
    p.add_argument("--out", required=True)
    p.add_argument("--limit-bytes", type=int, default=None)
    a = p.parse_args(argv)
    tok = train_tokenizer(a.name, a.out, limit_bytes=a.limit_bytes)
    print(f"{a.name}: vocab {len(tok)} fingerprint {tokenizer_fingerprint(tok)} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
