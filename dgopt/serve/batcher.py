"""Requests <-> the decode loop: one worker thread owns the Decoder and runs one `generate` call at a time over a
batch of queued jobs.

The runtime cannot add a row to a running call (no continuous batching), so batching is next-batch: jobs that
arrive while a call runs wait in the queue and form the next call, up to `max_batch` rows. What may share a call:
- greedy jobs with greedy jobs: batched greedy equals one-row greedy (left padding is masked out, tested);
- sampled jobs without a seed with each other, under a fresh random seed per call;
- a sampled job with a seed runs alone: the runtime draws noise per call and row, so only a call of one row
  reproduces what `generate(prompt, seed=s)` returns;
- a job whose max_tokens would be cut by a longer prompt's max_seq_len budget waits for a call it fits in.
Each job gets its tokens through `sink(kind, value)` as the loop commits them (called on the worker thread):
("token", id) each (or ("tokens", ids) once at the end, for a job with per_token False), then
("end", "stop" | "length" | "cancelled") or ("error", exception)."""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Job", "Batcher"]
log = logging.getLogger("dgopt.serve")


@dataclass(eq=False)
class Job:
    ids: list[int]
    max_tokens: int
    sink: Callable[[str, object], None]
    sampled: bool = False
    seed: int | None = None
    # False: the tokens go to the sink together, before the end (a request that needs no token before then:
    # one wake-up of the consumer's thread per request instead of one per token)
    per_token: bool = True
    cancel: bool = False             # set by the consumer (client gone, stop string): the worker frees the row
    delivered: int = 0               # tokens sent to the sink (worker-owned)
    ended: bool = False              # the sink got its "end" / "error" (worker-owned)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None     # when its first token was committed
    _held: list[int] = field(default_factory=list)

    def _token(self, t: int) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.delivered += 1
        if self.per_token:
            self.sink("token", t)
        else:
            self._held.append(t)

    def _end(self, kind: str, value) -> None:
        if not self.ended:
            self.ended = True
            if self._held:
                self.sink("tokens", self._held)
            self.sink(kind, value)


class _BatchDone(Exception):
    """Raised from on_token when every row of the call has ended: the rest of the call would be thrown away."""


class Batcher:
    def __init__(self, decoder, max_batch: int | None = None, on_batch: Callable[[dict], None] | None = None):
        self.dec = decoder
        self.max_batch = min(max_batch or decoder.max_batch, decoder.max_batch)
        self.on_batch = on_batch             # stats of each finished call (metrics)
        st = decoder.manifest["strategy"]
        # positions a multi-token strategy may hold back under max_seq_len (an upper bound: only used to decide
        # which jobs can share a call without a shorter budget than each would get alone)
        self._margin = (st.get("k_max") or st.get("k") or 0) + st.get("block", 0) + st.get("window", 0) + \
            st.get("ngram", 0)
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.busy = False
        self._thread = threading.Thread(target=self._work, name="dgopt-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.append(job)
            self._cv.notify()

    def queue_depth(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # -- worker thread --------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - never let the worker die: fail the jobs, keep serving
                log.exception("batch failed outside generate")
                for j in batch:
                    j._end("error", e)

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._closed and not self._queue:
                self._cv.wait()
            if self._closed:
                for j in self._queue:
                    j._end("error", RuntimeError("the server is shutting down"))
                return None
            while self._queue and self._queue[0].cancel:   # its client left while it queued
                self._queue.popleft()._end("end", "cancelled")
            if not self._queue:
                return []
            first = self._queue.popleft()
            batch = [first]
            if not (first.sampled and first.seed is not None):
                keep: deque[Job] = deque()
                for j in self._queue:
                    if len(batch) < self.max_batch and not j.cancel and j.sampled == first.sampled and \
                            j.seed is None and self._fits(batch + [j]):
                        batch.append(j)
                    else:
                        keep.append(j)
                self._queue = keep
            return batch

    def _fits(self, batch: list[Job]) -> bool:
        """Every row keeps the budget it would get alone: the call's longest prompt must leave room for its
        max_tokens (the runtime's budget is per call: max_seq_len minus the longest prompt)."""
        L = max(len(j.ids) for j in batch)
        return all(len(j.ids) == L or L + j.max_tokens + self._margin <= self.dec.max_seq_len for j in batch)

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        self.busy = True
        try:
            self._call(batch)
        finally:
            self.busy = False

    def _call(self, batch: list[Job], skip: list[int] | None = None) -> None:
        """One generate call. `skip`: tokens per row already delivered (a retry after a failed batch: greedy and
        seeded calls repeat themselves, so the first ones are not sent twice)."""
        dec = self.dec
        B = len(batch)
        skip = skip or [0] * B
        mts = [j.max_tokens for j in batch]
        counts = [0] * B
        top = max(mts)
        first = batch[0]
        seed = first.seed if first.seed is not None else (random.getrandbits(31) if first.sampled else None)

        idle = [False] * B          # rows the runtime itself has stopped (EOS, or the call's max_new_tokens)

        def on_token(toks):
            for b, t in enumerate(toks):
                if t is None:
                    continue
                j = batch[b]
                counts[b] += 1
                idle[b] = t in dec.eos or counts[b] >= top
                if j.ended:
                    continue
                if j.cancel:
                    j._end("end", "cancelled")
                    continue
                if counts[b] > skip[b]:
                    j._token(t)
                if t in dec.eos:
                    j._end("end", "stop")
                elif counts[b] >= mts[b]:
                    j._end("end", "length")
            # every row has ended here, but the call would go on for a row it still runs (cut by a smaller
            # max_tokens than the call's, or cancelled): stop it, its tokens would be thrown away
            if all(j.ended or j.cancel for j in batch) and not all(idle):
                raise _BatchDone

        t0 = time.perf_counter()
        try:
            # TODO(runtime): with per-row max_new_tokens and should_stop, pass mts and the cancelled rows instead
            res = dec.generate([j.ids for j in batch], max_new_tokens=top, seed=seed, on_token=on_token)
        except _BatchDone:
            res = None
        except Exception as e:  # noqa: BLE001 - one request's failure must not fail the others
            if B == 1:
                log.warning("request failed: %s", e, exc_info=not isinstance(e, ValueError))
                first._end("error", e)
                return
            # which row failed is unknown: each unfinished job again alone, so only the failing one errors
            log.warning("batch of %d failed (%s): retrying its rows one by one", B, e)
            for j, c in zip(batch, counts):
                if not j.ended:
                    self._call([j], [c])
            return
        for b, j in enumerate(batch):       # rows the call stopped itself (max_seq_len) or that were cancelled
            if not j.ended:
                j._end("end", "cancelled" if j.cancel else
                       "stop" if res is not None and res.stats["stop"][b] == "eos" else "length")
        if self.on_batch is not None:
            stats = dict(res.stats) if res is not None else {}
            stats.update(batch=B, tokens=sum(counts), seconds=time.perf_counter() - t0,
                         freed=sum(j.cancel and not idle[b] for b, j in enumerate(batch)))
            self.on_batch(stats)
