"""The host loop: prefill, step, stop. Left-pads a batch, builds explicit positions and the additive 4D mask, feeds
noise / repetition state, and collects stats."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..artifact import read_manifest
from ..errors import ArtifactError
from .noise import NoiseStream
from .session import make_session

__all__ = ["Decoder", "GenerateResult", "load"]

MASK_MIN = float(np.finfo(np.float32).min)   # finite: a fully masked (pad) query row stays NaN-free


@dataclass
class GenerateResult:
    ids: list[list[int]]                     # new tokens per row (EOS included when it stopped the row)
    text: list[str] | None = None
    stats: dict = field(default_factory=dict)


def build_mask(valid: np.ndarray, past: int, q: int) -> np.ndarray:
    """[B,1,q,past+q] additive mask: query i (absolute past+i) sees key j iff j <= past+i and j is not padding."""
    total = past + q
    causal = np.arange(total)[None, :] <= (past + np.arange(q))[:, None]          # [q, total]
    allowed = causal[None, :, :] & valid[:, None, :total].astype(bool)           # [B, q, total]
    return np.where(allowed, 0.0, MASK_MIN).astype(np.float32)[:, None]


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
        loop = st.get("k_schedule") == "heuristic" or bool(st.get("confidence"))
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
        self.document = None        # strategy ngram: token ids searched before the context (set_document)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tok = self.manifest.get("tokenizer")
            if not tok:
                raise ValueError("this artifact has no tokenizer (random-init model); pass token ids instead of text")
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

    def generate(self, prompts, max_new_tokens: int = 64, seed: int | None = None,
                 on_token: Callable[[list[int | None]], None] | None = None) -> GenerateResult:
        """`prompts`: a token-id list, a list of them (a batch), a string or a list of strings."""
        rows, had_text = self._as_rows(prompts)
        B = len(rows)
        if B > self.max_batch:
            raise ValueError(f"batch of {B} exceeds the artifact's target.max_batch {self.max_batch}")
        if any(len(r) == 0 for r in rows):
            raise ValueError("empty prompt")
        L = max(len(r) for r in rows)
        if self.manifest["strategy"]["kind"] in ("lookahead", "jacobi", "speculative", "uag", "ngram"):
            from .multitoken import generate_multitoken
            res = generate_multitoken(self, rows, max_new_tokens, on_token, seed)
            if had_text:
                res.text = [self.decode(r) for r in res.ids]
            return res
        if L >= self.max_seq_len:
            raise ValueError(f"prompt of {L} tokens leaves no room under target.max_seq_len {self.max_seq_len}")
        budget = min(max_new_tokens, self.max_seq_len - L)
        ids = np.full((B, L), self.pad, np.int64)
        valid = np.zeros((B, L + budget), np.int8)
        for b, r in enumerate(rows):
            ids[b, L - len(r):] = r
            valid[b, L - len(r):] = 1
        npos = np.array([len(r) for r in rows], np.int64)           # next real position per row
        pos = np.maximum(np.cumsum(valid[:, :L], axis=1) - 1, 0).astype(np.int64)

        needs = self.session.inputs
        sseed = self.manifest["sampling"].get("seed", 0) if seed is None else seed
        noise = {name: NoiseStream(name, sseed, (B,) if name == "uniform" else (B, self.vocab_size), total=budget)
                 for name in ("uniform", "gumbel") if name in needs}
        seen = None
        if "seen" in needs:
            seen = np.zeros((B, self.vocab_size), np.float32)
            for b, r in enumerate(rows):
                seen[b, r] = 1.0

        cache = self.session.new_cache(B)
        out_ids: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        reason = ["max_new_tokens"] * B
        past, steps = 0, 0
        t0 = time.perf_counter()
        t_prefill = None
        while steps < budget:
            q = ids.shape[1]
            feeds = {"input_ids": ids, "position_ids": pos, "attn_mask": build_mask(valid, past, q)}
            for name, stream in noise.items():
                feeds[name] = stream.next()
            if seen is not None:
                feeds["seen"] = seen
            out, cache = self.session.run(feeds, cache)
            tok = out["next_token"].astype(np.int64)
            steps += 1
            past += q
            if t_prefill is None:
                t_prefill = time.perf_counter() - t0
            emitted: list[int | None] = [None] * B
            for b in range(B):
                if done[b]:
                    continue
                t = int(tok[b])
                out_ids[b].append(t)
                emitted[b] = t
                if seen is not None:
                    seen[b, t] = 1.0
                if t in self.eos:
                    done[b], reason[b] = True, "eos"
            if on_token:
                on_token(emitted)
            if done.all():
                break
            valid[:, past] = 1
            ids = np.where(done, self.pad, tok)[:, None].astype(np.int64)
            pos = npos[:, None].copy()
            npos += 1
        for stream in noise.values():
            stream.close()
        for b in range(B):
            if reason[b] == "max_new_tokens" and len(out_ids[b]) < max_new_tokens:
                reason[b] = "max_seq_len"
        elapsed = time.perf_counter() - t0
        new = sum(len(r) for r in out_ids)
        stats = {
            "steps": steps, "new_tokens": new, "batch": B,
            "tokens_per_step": round(new / (B * steps), 4) if steps else 0.0,
            "prefill_s": round(t_prefill or 0.0, 6), "total_s": round(elapsed, 6),
            "decode_tokens_per_s": round((new - B) / max(elapsed - (t_prefill or 0), 1e-9), 2) if steps > 1 else 0.0,
            "tokens_per_s": round(new / max(elapsed, 1e-9), 2), "stop": reason,
        }
        text = [self.decode(r) for r in out_ids] if had_text or self.manifest.get("tokenizer") and \
            self._tokenizer is not None else None
        return GenerateResult(out_ids, text, stats)

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
