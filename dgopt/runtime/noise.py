"""Noise drawn ahead of the steps that use it ("precomputed"): chunks of many steps are generated in bulk on a
background thread while the current chunk is consumed, so drawing is off the critical path. One producer thread and
one PCG64 stream per generate call: a seeded run is reproducible, and no draw is ever reused."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["NoiseStream"]

_CHUNK_BYTES = 8 << 20


class NoiseStream:
    def __init__(self, kind: str, seed: int | np.random.SeedSequence, shape: tuple[int, ...], max_chunk: int = 256):
        if kind not in ("uniform", "gumbel"):
            raise ValueError(f"unknown noise kind '{kind}'")
        self.kind, self.shape = kind, tuple(shape)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        per_step = int(np.prod(shape)) * 4
        self.chunk = int(max(2, min(max_chunk, _CHUNK_BYTES // max(per_step, 1))))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dgopt-noise")
        self._next = self._pool.submit(self._draw)
        self._buf = None
        self._i = self.chunk

    def _draw(self) -> np.ndarray:
        u = self.rng.random((self.chunk, *self.shape), dtype=np.float32)
        if self.kind == "uniform":
            return u
        with np.errstate(divide="ignore"):       # u == 0 gives -inf: that token simply never wins
            np.log(u, out=u)
            np.negative(u, out=u)
            np.log(u, out=u)
            np.negative(u, out=u)
        return u

    def next(self) -> np.ndarray:
        if self._i == self.chunk:
            self._buf = self._next.result()
            self._next = self._pool.submit(self._draw)
            self._i = 0
        self._i += 1
        return self._buf[self._i - 1]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
