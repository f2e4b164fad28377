"""Noise drawn ahead of the steps that use it ("precomputed"): chunks of many steps are generated in bulk on a
background thread while the current chunk is consumed, so drawing is off the critical path. One producer thread and
one PCG64 stream per generate call: a seeded run is reproducible, and no draw is ever reused. `total` (the most
draws the call can use, e.g. max_new_tokens) caps the chunks: on a 2-core CPU, drawing 256 steps of [V] Gumbel
noise ahead for a 96-token call cost more CPU than the step's own sampling (the producer shares the cores with
onnxruntime). The sequence does not depend on the chunking (one stream, drawn in order)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["NoiseStream"]

_CHUNK_BYTES = 8 << 20


class NoiseStream:
    def __init__(self, kind: str, seed: int | np.random.SeedSequence, shape: tuple[int, ...], max_chunk: int = 256,
                 total: int | None = None):
        if kind not in ("uniform", "gumbel"):
            raise ValueError(f"unknown noise kind '{kind}'")
        self.kind, self.shape = kind, tuple(shape)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        per_step = int(np.prod(shape)) * 4
        self.chunk = int(max(1, min(max_chunk, _CHUNK_BYTES // max(per_step, 1), total or max_chunk)))
        self._left = total          # draws the call may still need beyond those submitted (None: unbounded)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dgopt-noise")
        self._next = self._submit()
        self._buf = None
        self._i = 0

    def _submit(self):
        n = self.chunk if self._left is None else max(1, min(self.chunk, self._left))
        if self._left is not None:
            self._left -= n
        return self._pool.submit(self._draw, n)

    def _draw(self, n: int) -> np.ndarray:
        u = self.rng.random((n, *self.shape), dtype=np.float32)
        if self.kind == "uniform":
            return u
        with np.errstate(divide="ignore"):       # u == 0 gives -inf: that token simply never wins
            np.log(u, out=u)
            np.negative(u, out=u)
            np.log(u, out=u)
            np.negative(u, out=u)
        return u

    def next(self) -> np.ndarray:
        if self._buf is None or self._i == len(self._buf):
            # past `total` (a caller's miscount) it draws on demand: slower, never a reused draw
            self._buf = (self._next or self._submit()).result()
            self._next = self._submit() if self._left is None or self._left > 0 else None
            self._i = 0
        self._i += 1
        return self._buf[self._i - 1]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
