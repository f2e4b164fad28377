"""A loaded artifact: its manifest, step sessions and tokenizers. Generation is the one decode loop (loop.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..artifact import read_manifest
from ..errors import ArtifactError
from .loop import GenerateResult, generate
from .session import make_session

__all__ = ["Decoder", "GenerateResult", "load"]


class Decoder:
    """A loaded artifact. `generate` is re-entrant: every call starts from a fresh cache and fresh noise."""

    def __init__(self, art_dir: str | Path, device: str | None = None, threads: int | None = None,
                 io_binding: bool | None = None):
        self.path = Path(art_dir)
        self.manifest = read_manifest(self.path)
        self.session = make_session(self.path, self.manifest, device, threads, io_binding=io_binding)
        self.draft_session = None
        if (self.manifest.get("draft") or {}).get("step"):     # a fused step has the draft inside step.onnx
            # the draft runs on the calling thread alone: its kernels are too small to gain from a pool, and the
            # target's spinning workers then never compete with draft workers for the cores (measured, 2 cores:
            # speculative k2 0.69x -> 0.93x of autoregressive against both sessions 2 threads without spinning)
            d = self.manifest["draft"]
            dman = {**self.manifest, "step": d["step"], "io": d["io"], "model": d["model"],
                    "target": {**self.manifest["target"], "backend": "onnx"}}
            self.draft_session = make_session(self.path, dman, device, 1, io_binding=io_binding)
        # k_schedule heuristic or a confidence threshold: a per-step draft_k goes to whichever graph holds the
        # draft's loop
        st = self.manifest["strategy"]
        loop = st["kind"] != "ngram" and (st.get("k_schedule") == "heuristic" or bool(st.get("confidence")))
        has_k = any("draft_k" in s.inputs for s in (self.session, self.draft_session) if s is not None)
        if loop != has_k:
            raise ArtifactError(f"corrupt manifest: strategy.k_schedule '{st.get('k_schedule')}' and confidence "
                                f"{st.get('confidence', 0)} but the step graphs "
                                f"{'take no' if loop else 'take a'} draft_k input")
        m = self.manifest["model"]
        self.vocab_size = m["vocab_size"]
        self.eos = set(m["eos_token_ids"])
        self.pad = m["pad_token_id"]
        self.max_seq_len = self.manifest["target"]["max_seq_len"]
        self.max_batch = self.manifest["target"]["max_batch"]
        self._tokenizer = self._draft_tokenizer = None
        # strategy.draft_max_batch: calls with more rows run the nested autoregressive artifact (loaded on first use)
        self._fallback, self._fallback_args = None, (device, threads, io_binding)
        fb = self.manifest.get("fallback")
        if fb is not None and not (isinstance(fb, dict) and isinstance(fb.get("above_batch"), int)
                                   and isinstance(fb.get("dir"), str) and "/" not in fb["dir"]
                                   and fb["dir"] not in ("", ".", "..") and (self.path / fb["dir"]).is_dir()):
            raise ArtifactError(f"corrupt manifest: fallback {fb!r} is not {{dir: a subdirectory of {self.path}, "
                                "above_batch: int}")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tok = self.manifest.get("tokenizer")
            if not tok:
                src = self.manifest["model"].get("source", "")
                why = "a random-init model" if src.startswith("random-init") else \
                    f"the model dir {src} has no tokenizer files"
                raise ValueError(f"this artifact has no tokenizer ({why}); pass token ids instead of text "
                                 "(dgopt run --ids)")
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.path / tok)
        return self._tokenizer

    @property
    def draft_tokenizer(self):
        """The draft model's own tokenizer (strategy uag)."""
        if self._draft_tokenizer is None:
            tok = (self.manifest.get("draft") or {}).get("tokenizer")
            if not tok:
                raise ValueError("this artifact has no draft tokenizer")
            from transformers import AutoTokenizer
            self._draft_tokenizer = AutoTokenizer.from_pretrained(self.path / tok)
        return self._draft_tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def generate(self, prompts, max_new_tokens: int | Sequence[int] = 64, seed: int | None = None,
                 on_token: Callable[[list[int | None]], None] | None = None,
                 should_stop: Callable[[], Iterable[int]] | None = None,
                 admit: Callable[[list[int]], list[tuple[int, list[int], int]]] | None = None,
                 on_done: Callable[[int, str], None] | None = None) -> GenerateResult:
        """`prompts`: a token-id list, a list of them (a batch), a string or a list of strings.
        `max_new_tokens`: one limit, or one per row. `on_token(tokens)`: each committed token index, one entry per
        row (None: nothing new for that row). `should_stop()`: called once per step; the rows it names stop there
        (stop reason "cancelled"). Continuous batching (greedy autoregressive, and a greedy call that
        runs a strategy.draft_max_batch fallback; others ignore it): `admit(free)` is
        asked after every step for rows to start, [(row, prompt ids, max_new_tokens)], row a finished one of `free`
        or the next index (up to max_batch); `on_done(row, reason)` says when each row ends. Row indices are then
        reused: read tokens through the callbacks, not the result."""
        rows, had_text = self._as_rows(prompts)
        if len(rows) > self.max_batch:
            raise ValueError(f"batch of {len(rows)} exceeds the artifact's target.max_batch {self.max_batch}")
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("empty prompt")
        fb = self.manifest.get("fallback")
        if fb and len(rows) > fb["above_batch"]:
            if self._fallback is None:
                self._fallback = Decoder(self.path / fb["dir"], *self._fallback_args)
            # a greedy fallback call takes joining rows like any autoregressive call (a server under load gets
            # continuous batching from an artifact whose own strategy takes none)
            res = generate(self._fallback, rows, max_new_tokens, seed, on_token, should_stop, admit, on_done)
            res.stats["fallback"] = "autoregressive"
        else:
            res = generate(self, rows, max_new_tokens, seed, on_token, should_stop, admit, on_done)
        if had_text or self._tokenizer is not None:
            res.text = [self.decode(r) for r in res.ids]
        return res

    def _as_rows(self, prompts) -> tuple[list[list[int]], bool]:
        if isinstance(prompts, str):
            return [self.encode(prompts)], True
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        prompts = list(prompts)
        if prompts and all(isinstance(p, str) for p in prompts):
            return [self.encode(p) for p in prompts], True
        if prompts and all(isinstance(p, (int, np.integer)) for p in prompts):
            prompts = [prompts]
        rows = [[int(t) for t in p] for p in prompts]
        for r in rows:
            bad = [t for t in r if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return rows, False


def load(art_dir: str | Path, device: str | None = None, threads: int | None = None,
         io_binding: bool | None = None) -> Decoder:
    """Load a compiled artifact (checks manifest schema and file hashes). `device` overrides the artifact's target
    device; `io_binding` keeps the KV cache on the device between steps (default: on for cuda)."""
    return Decoder(art_dir, device, threads, io_binding)
