"""Requests <-> the decode loop: one worker thread owns the Decoder and runs one `generate` call at a time over a
batch of queued jobs.

Greedy jobs join a running greedy call (continuous batching: the loop asks at every step, and a queued job takes a
finished row's place, or a new row up to `max_batch`, its prompt prefilled in the next step beside the running
rows' tokens), when the strategy allows it (autoregressive: dgopt/runtime/loop.py Loop.joinable, and a call of more
than strategy.draft_max_batch rows, which runs the artifact's autoregressive fallback); otherwise
batching is next-batch: jobs that arrive while a call runs wait in the queue and form the next call, up to
`max_batch` rows. What may share a call:
- greedy jobs with greedy jobs: batched greedy equals one-row greedy (left padding is masked out, tested);
- sampled jobs without a seed with each other, under a fresh random seed per call;
- a sampled job with a seed runs alone: the runtime draws noise per call and row, so only a call of one row
  reproduces what `generate(prompt, seed=s)` returns.
Each row has its own max_new_tokens; a row whose request ended early (client gone, stop string) is stopped by the
call's should_stop at the next step (its place is free for a joining job, or empty until the call ends).
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


class Batcher:
    def __init__(self, decoder, max_batch: int | None = None, on_batch: Callable[[dict], None] | None = None,
                 gather_s: float = 0.01, continuous: bool = True):
        self.dec = decoder
        self.continuous = continuous         # False: next-batch batching only
        self.max_batch = min(max_batch or decoder.max_batch, decoder.max_batch)
        # Next-batch batching falls into ruts: of 4 clients, the two whose requests came first finish together
        # while the two others wait for the next call, so calls alternate 2 and 2 rows for ever. The clients of
        # the last call send their next requests moments after it ends: before a call, wait for as many new
        # arrivals as the last call had rows (with one client: its own next request, no wait), up to gather_s or
        # 5% of the last call's time, whichever is longer (on a loaded machine the clients come back later and
        # the calls take longer too), at most 0.1 s; never once the batch is full.
        self.gather_s = gather_s
        self._last, self._last_s = 1, 0.0
        # jobs submitted so far / by the time the last call's last job ended (its response may be out, and its
        # client's next request in, before the call itself returns: that request counts as a new arrival)
        self._arrivals = self._mark = self._ended_at = 0
        self.on_batch = on_batch             # stats of each finished call (metrics)
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
            self._arrivals += 1
            self._cv.notify()

    @property
    def alive(self) -> bool:
        """Whether the decode worker is running (GET /health)."""
        return self._thread.is_alive()

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
            deadline = time.monotonic() + min(max(self.gather_s, 0.05 * self._last_s), 0.1)
            while not self._closed and len(self._queue) < self.max_batch and \
                    self._arrivals - self._mark < self._last and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
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
                            j.seed is None:
                        batch.append(j)
                    else:
                        keep.append(j)
                self._queue = keep
            self._last = len(batch)
            return batch

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        self.busy = True
        t = time.perf_counter()
        try:
            self._call(batch)
        finally:
            self.busy = False
            self._last_s = time.perf_counter() - t
            with self._cv:
                self._mark = min(self._ended_at, self._arrivals)

    def _call(self, batch: list[Job], skip: list[int] | None = None) -> None:
        """One generate call. `skip`: tokens per row already delivered (a retry after a failed batch: greedy and
        seeded calls repeat themselves, so the first ones are not sent twice; an unseeded sampled row that already
        got tokens is not retried, it fails). A greedy call that is not a retry takes queued greedy jobs while it
        runs (continuous batching: the loop asks at every step, a job joins at a finished row's place or as a new
        row up to max_batch); rows[b] is the job row b serves now."""
        dec = self.dec
        rows: list[Job] = list(batch)
        every: list[Job] = list(batch)          # each job the call served (a failed call retries the unfinished)
        skips = dict(zip(batch, skip or [0] * len(batch)))
        counts = {j: 0 for j in batch}
        first = batch[0]
        seed = first.seed if first.seed is not None else (random.getrandbits(31) if first.sampled else None)

        def end(j, reason):
            if not j.ended:
                self._ended_at = self._arrivals
                j._end("end", reason)

        def on_token(toks):
            for b, t in enumerate(toks):
                if t is None:
                    continue
                j = rows[b]
                counts[j] += 1
                if j.ended or j.cancel:
                    continue
                if counts[j] > skips.get(j, 0):
                    j._token(t)
                if t in dec.eos:
                    end(j, "stop")
                elif counts[j] >= j.max_tokens:
                    end(j, "length")

        freed = [0]

        def on_done(b, reason):
            freed[0] += reason == "cancelled"
            end(rows[b], {"eos": "stop", "cancelled": "cancelled"}.get(reason, "length"))

        def should_stop():          # once per step: the rows whose client left or whose stop string matched
            return [b for b, j in enumerate(rows) if j.cancel]

        def admit(free):
            if self._closed or not self._queue:
                return []
            room = self.max_batch - (len(rows) - len(free))
            out = []
            with self._cv:
                keep: deque[Job] = deque()
                for j in self._queue:
                    if room > 0 and not j.cancel and not j.sampled:
                        b = free.pop(0) if free else len(rows)
                        if b == len(rows):
                            rows.append(j)
                        else:
                            rows[b] = j
                        every.append(j)
                        counts[j] = 0
                        out.append((b, j.ids, j.max_tokens))
                        room -= 1
                    else:
                        keep.append(j)
                self._queue = keep
            return out

        t0 = time.perf_counter()
        retry = any(skips.values())
        try:
            res = dec.generate([j.ids for j in batch], max_new_tokens=[j.max_tokens for j in batch], seed=seed,
                               on_token=on_token, should_stop=should_stop, on_done=on_done,
                               admit=None if retry or first.sampled or not self.continuous else admit)
        except Exception as e:  # noqa: BLE001 - one request's failure must not fail the others
            if len(every) == 1:
                log.warning("request failed: %s", e, exc_info=not isinstance(e, ValueError))
                first._end("error", e)
                return
            # which row failed is unknown: each unfinished job again alone, so only the failing one errors
            log.warning("batch of %d failed (%s): retrying its rows one by one", len(every), e)
            for j in every:
                if j.ended:
                    continue
                c = counts[j]
                if c and j.sampled and j.seed is None:
                    # an unseeded draw does not repeat: its delivered tokens and a retry would be two samples
                    j._end("error", e)
                else:
                    self._call([j], [c])
            return
        for j in every:       # rows the call stopped itself (max_seq_len) or that were cancelled
            end(j, "length")
        if self.on_batch is not None:
            stats = dict(res.stats)
            stats.update(batch=len(rows), tokens=sum(counts.values()), seconds=time.perf_counter() - t0,
                         freed=freed[0], requests=len(every))
            self.on_batch(stats)
