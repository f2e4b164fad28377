"""The OpenAI-compatible HTTP API over one artifact: POST /v1/completions (text or token-id prompts, SSE streaming),
GET /v1/models, /health, /metrics.

Sampling parameters are compiled into the step graph (the sampler is part of it), so a request may only restate
them: temperature / top_p / top_k / min_p / repetition_penalty equal to the artifact's values (or omitted) are
accepted, anything else is a 400 naming the compiled value. The server holds no state between requests."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from .batcher import Batcher, Job
from .metrics import Metrics
from .text import TextStream

__all__ = ["create_app", "CompletionRequest"]
log = logging.getLogger("dgopt.serve")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completions request; fields we cannot honour are accepted only at their neutral value."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = 16
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    echo: bool = False
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None                      # vLLM's extensions, same rule as temperature
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None
    return_token_ids: bool = False                # vLLM's extension: prompt_token_ids / token_ids in the choice


class BadRequest(Exception):
    def __init__(self, param: str | None, message: str, status: int = 400):
        super().__init__(message if not param or message.startswith(param) else f"{param}: {message}")
        self.param, self.status = param, status


def _error(status: int, message: str, param: str | None = None, kind: str | None = None) -> JSONResponse:
    kind = kind or {400: "invalid_request_error", 404: "not_found_error"}.get(status, "internal_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class _Bridge:
    """Worker-thread events -> the requests' asyncio queues, one event-loop wake-up per burst: a step of a batch
    of 8 commits 8 tokens, and waking the loop 8 times costs more than the tokens' own handling. `interval` > 0:
    at most one wake-up per interval seconds (the streams' writes then carry several tokens each: at one row a
    token takes well under a millisecond, and each wake-up and socket write costs a good part of that); a burst
    after a quiet interval (a first token) goes at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0):
        self.loop, self.interval = loop, interval
        self._pending: list = []
        self._lock = threading.Lock()
        self._last = 0.0

    def post(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:          # a drain is already scheduled
                return
        wait = self._last + self.interval - time.perf_counter() if self.interval else 0.0
        if wait > 0:
            self.loop.call_soon_threadsafe(self.loop.call_later, wait, self._drain)
        else:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
            self._last = time.perf_counter()
        for queue, item in items:
            queue.put_nowait(item)


class _Sink:
    """One request's end of the bridge: what the worker calls, and the queue the request reads."""

    def __init__(self, bridge: _Bridge):
        self.bridge, self.queue = bridge, asyncio.Queue()

    def __call__(self, kind: str, value) -> None:
        self.bridge.post(self.queue, (kind, value))


class Server:
    def __init__(self, decoder, max_batch: int | None = None, model_name: str | None = None,
                 stream_interval: float = 0.0, continuous: bool = True):
        self.dec = decoder
        self.stream_interval = stream_interval
        m = decoder.manifest
        self.model_name = model_name or Path(decoder.path).resolve().name
        self.sampling = m["sampling"]
        self.greedy = self.sampling["kind"] == "greedy"
        self.has_tokenizer = bool(m.get("tokenizer"))
        if self.has_tokenizer:
            decoder.tokenizer           # load it now, not in the first request
        try:                            # and the session's first-run costs: /health is ok when warm
            decoder.generate([[decoder.pad]], max_new_tokens=2)
        except Exception as e:  # noqa: BLE001 - a warm-up is no reason not to serve; requests will tell
            log.warning("warm-up generate failed: %s", e)
        self.created = int(time.time())
        self._bridge: _Bridge | None = None
        self.metrics = Metrics(lambda: self.batcher.queue_depth(), self.model_name, m["strategy"]["kind"])
        self.batcher = Batcher(decoder, max_batch, on_batch=self.metrics.on_batch, continuous=continuous)

    # -- validation ------------------------------------------------------------------------------------------------
    def check(self, req: CompletionRequest) -> tuple[list[int], list[str]]:
        dec = self.dec
        if req.model is not None and req.model != self.model_name:
            raise BadRequest("model", f"model '{req.model}' is not served here (this server: '{self.model_name}')",
                             404)
        if req.n != 1:
            raise BadRequest("n", "n must be 1 (send several requests; they are batched)")
        if req.best_of not in (None, 1):
            raise BadRequest("best_of", "best_of must be 1")
        for name in ("logprobs", "suffix"):
            if getattr(req, name) is not None:
                raise BadRequest(name, f"{name} is not supported")
        if req.logit_bias:
            raise BadRequest("logit_bias", "logit_bias is not supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0):
                raise BadRequest(name, f"{name} is not supported (the artifact's repetition_penalty is "
                                 f"{self.sampling.get('repetition_penalty', 1.0)}, compiled in)")
        self._check_sampling(req)
        if req.max_tokens is not None and req.max_tokens <= 0:
            raise BadRequest("max_tokens", f"max_tokens must be >= 1 (got {req.max_tokens})")
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise BadRequest("prompt", "one prompt per request (n=1): send several requests")
            p = p[0]
        if isinstance(p, str):
            if not self.has_tokenizer:
                raise BadRequest("prompt", "this artifact has no tokenizer: send the prompt as token ids")
            ids = dec.encode(p)
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < dec.vocab_size]
            if bad:
                raise BadRequest("prompt", f"token id {bad[0]} is outside the vocabulary [0, {dec.vocab_size})")
        if not ids:
            raise BadRequest("prompt", "empty prompt")
        if len(ids) >= dec.max_seq_len:
            raise BadRequest("prompt", f"prompt of {len(ids)} tokens leaves no room under the artifact's "
                                       f"max_seq_len {dec.max_seq_len}")
        if req.max_tokens is not None and len(ids) + req.max_tokens > dec.max_seq_len:
            # as OpenAI and vLLM: a request that cannot get what it asks for is refused, not cut short
            raise BadRequest("max_tokens", f"prompt of {len(ids)} tokens + max_tokens {req.max_tokens} exceeds the "
                                           f"artifact's max_seq_len {dec.max_seq_len}")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if stop and not self.has_tokenizer:
            raise BadRequest("stop", "stop strings need a tokenizer; this artifact has none")
        if any(not s for s in stop):
            raise BadRequest("stop", "stop strings must not be empty")
        return ids, stop

    def _check_sampling(self, req: CompletionRequest) -> None:
        s = self.sampling
        why = "sampling is compiled into the artifact's step graph"
        if req.temperature is not None:
            ok = req.temperature == 0 if self.greedy else abs(req.temperature - s["temperature"]) < 1e-6
            if not ok:
                want = "0 (or omitted): the artifact decodes greedily" if self.greedy else \
                    f"{s['temperature']} (or omitted)"
                raise BadRequest("temperature", f"temperature must be {want}; {why}")
        compiled = {"top_p": (s.get("top_p", 1.0), 1.0), "top_k": (s.get("top_k", 0), 0),
                    "min_p": (s.get("min_p", 0.0), 0.0),
                    "repetition_penalty": (s.get("repetition_penalty", 1.0), 1.0)}
        for name, (value, off) in compiled.items():
            got = getattr(req, name)
            if got is None:
                continue
            if name == "top_k" and got == -1:       # vLLM's "off"
                got = 0
            if self.greedy and name != "repetition_penalty":
                value = off                         # greedy: the warpers do not apply
            if abs(got - value) > 1e-6:
                raise BadRequest(name, f"{name} must be {value} (or omitted): {why}")

    # -- the completion ----------------------------------------------------------------------------------------------
    async def complete(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.metrics.requests.labels("bad_request").inc()
            return _error(400, f"malformed JSON body: {e}")
        try:
            if not isinstance(body, dict):
                raise BadRequest(None, "the body must be a JSON object")
            try:
                req = CompletionRequest.model_validate(body)
            except ValidationError as e:
                err = e.errors()[0]
                field = str(err["loc"][0]) if err["loc"] else None
                msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
                raise BadRequest(field, msg) from None
            ids, stop = self.check(req)
        except BadRequest as e:
            self.metrics.requests.labels("bad_request").inc()
            return _error(e.status, str(e), e.param)
        sampled = not self.greedy
        loop = asyncio.get_running_loop()
        if self._bridge is None or self._bridge.loop is not loop:
            self._bridge = _Bridge(loop, self.stream_interval)
        sink = _Sink(self._bridge)
        budget = req.max_tokens if req.max_tokens is not None else self.dec.max_seq_len - len(ids)
        # a whole response without stop strings needs no token before the end
        job = Job(ids, budget, sink, sampled=sampled, seed=req.seed if sampled else None,
                  per_token=req.stream or bool(stop))
        self.batcher.submit(job)
        self.metrics.prompt_tokens.inc(len(ids))
        ctx = _Completion(self, req, ids, stop, job, sink, t0)
        if req.stream:
            return StreamingResponse(ctx.sse(), media_type="text/event-stream")
        return await ctx.whole(request)


class _Completion:
    """One request's events -> OpenAI JSON (whole or as SSE chunks)."""

    def __init__(self, server: Server, req: CompletionRequest, ids, stop, job: Job, sink: _Sink, t0: float):
        self.s, self.req, self.ids, self.job, self.sink, self.t0 = server, req, ids, job, sink, t0
        self.text = TextStream(server.dec.decode if server.has_tokenizer else None, stop)
        self.tokens: list[int] = []
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.first = None

    def _echo(self) -> str:
        if not self.req.echo:
            return ""
        p = self.req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            p = p[0]
        return p if isinstance(p, str) else (self.s.dec.decode(self.ids) if self.s.has_tokenizer else "")

    def _on(self, kind: str, value) -> tuple[int | None, str, str | None]:
        """One worker event -> (token or None, text delta, finish_reason or None); raises a failed request's
        error."""
        if kind == "error":
            raise value
        if kind == "end":
            return None, "", {"stop": "stop", "length": "length", "cancelled": "stop"}[value]
        if kind == "tokens":                       # a whole completion at once (per_token False)
            return None, "".join(self._on("token", t)[1] for t in value), None
        if self.first is None:
            self.first = True
            self.s.metrics.ttft.observe(self.job.t_first - self.t0)
        if self.text.stopped:                      # tokens the worker committed before it saw the cancel
            return None, "", None
        self.tokens.append(value)
        if value in self.s.dec.eos:                # counted, not shown (as OpenAI / vLLM)
            return value, "", None
        delta = self.text.add(value)
        if self.text.stopped:
            self.job.cancel = True                 # frees the row at its next token
            return value, delta, "stop"
        return value, delta, None

    def _finish(self, outcome: str) -> None:
        m = self.s.metrics
        m.requests.labels(outcome).inc()
        m.generated.inc(len(self.tokens))
        m.latency.observe(time.perf_counter() - self.t0)

    def _usage(self) -> dict:
        n = len(self.tokens)
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n}

    def _choice(self, text: str, finish, token_ids=None) -> dict:
        c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if self.req.return_token_ids:
            c["token_ids"] = token_ids
        return c

    def _body(self, choices: list, usage: dict | None = None) -> dict:
        b = {"id": self.id, "object": "text_completion", "created": int(time.time()), "model": self.s.model_name,
             "choices": choices}
        if usage is not None:
            b["usage"] = usage
        return b

    async def whole(self, request: Request) -> Response:
        out, finish = [], None
        try:
            while finish is None:
                try:
                    ev = await asyncio.wait_for(self.sink.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.job.cancel = True
                        self._finish("cancelled")
                        return Response(status_code=499)
                    continue
                _, delta, finish = self._on(*ev)
                out.append(delta)
        except Exception as e:  # noqa: BLE001 - this request only
            return self._failed(e)
        out.append(self.text.finish())
        self._finish(finish)
        choice = self._choice(self._echo() + "".join(out), finish, list(self.tokens))
        if self.req.return_token_ids:
            choice["prompt_token_ids"] = self.ids
        return JSONResponse(self._body([choice], self._usage()))

    def _failed(self, e: Exception) -> JSONResponse:
        self.job.cancel = True
        if isinstance(e, ValueError):      # the runtime refused this prompt (e.g. no room for its lookahead)
            self._finish("bad_request")
            return _error(400, str(e), "prompt")
        log.error("request %s failed: %r", self.id, e)
        self._finish("error")
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    async def sse(self):
        def chunk(body: dict) -> str:
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
        finish = None
        try:
            echo = self._echo()
            if echo:
                yield chunk(self._body([self._choice(echo, None, [])]))
            # a token's chunk is a template filled in (it is the per-token cost of streaming), and the events
            # that are already there go out in one write
            head = "data: " + json.dumps(self._body([]), separators=(",", ":"))[:-3] + '[{"index":0,"text":'
            ids = self.req.return_token_ids
            mid = ',"logprobs":null,"finish_reason":null' + (',"token_ids":[' if ids else "")
            tail = ("]" if ids else "") + "}]}\n\n"
            queue = self.sink.queue
            try:
                while finish is None:
                    out = []
                    ev = await queue.get()
                    while True:
                        tok, delta, finish = self._on(*ev)
                        if tok is not None and (delta or self.req.return_token_ids):
                            out.append(head + json.dumps(delta) + mid + (str(tok) if ids else "") + tail)
                        if finish is not None or queue.empty():
                            break
                        ev = queue.get_nowait()
                    if out:
                        yield "".join(out)
            except Exception as e:  # noqa: BLE001 - this request only: an error event, then [DONE]
                finish = "error"
                yield f"data: {self._failed(e).body.decode()}\n\n"
            if finish != "error":
                yield chunk(self._body([self._choice(self.text.finish(), finish, [])]))
                self._finish(finish)
                if self.req.stream_options and self.req.stream_options.include_usage:
                    yield chunk(self._body([], self._usage()))
            yield "data: [DONE]\n\n"
        finally:
            if finish is None:                     # the client went away mid-stream: free its row
                self.job.cancel = True
                self._finish("cancelled")


def create_app(artifact, max_batch: int | None = None, model_name: str | None = None, device: str | None = None,
               threads: int | None = None, stream_interval: float = 0.0, continuous: bool = True) -> FastAPI:
    """`artifact`: an artifact dir or a loaded Decoder. `stream_interval`: seconds between a stream's writes at
    most (0: one per step). `continuous` False: next-batch batching only (requests never join a running call)."""
    from ..runtime import Decoder, load
    dec = artifact if isinstance(artifact, Decoder) else load(artifact, device=device, threads=threads)
    server = Server(dec, max_batch, model_name, stream_interval, continuous)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.batcher.close()

    app = FastAPI(title="dgopt serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            return await server.complete(request)
        except Exception as e:  # noqa: BLE001 - a bug in one request: 500 for it, the server goes on
            log.exception("request failed")
            server.metrics.requests.labels("error").inc()
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/v1/models")
    async def models():
        m = dec.manifest
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.created, "owned_by": "dgopt",
            "max_model_len": dec.max_seq_len, "strategy": m["strategy"]["kind"], "sampling": m["sampling"],
            "max_batch": server.batcher.max_batch}]}

    @app.get("/health")
    async def health():
        alive = server.batcher.alive
        return JSONResponse({"status": "ok" if alive else "decode worker stopped"}, 200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
