"""`dgopt serve`: the OpenAI API with the official client against a real server process, raw HTTP error cases,
streaming token by token, batching under concurrent load (each greedy response equals its one-at-a-time generate
output), a failing request isolated from its batch, and the Ray Serve path."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import dgopt  # noqa: E402
from dgopt.serve.text import TextStream  # noqa: E402

TOKENIZER = Path(dgopt.__file__).parent / "assets" / "models" / "code-tiny"
PROMPTS = ["def fib(n):", "import os\n", "class A:\n    def __init__(self", "x = [1, 2, 3]", "for i in range(",
           "# héllo wörld ✓", "return", "while True:\n"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny random Llama with code-tiny's byte-level BPE tokenizer (text prompts, multi-byte tokens)."""
    from dgopt.models.hf import config_model
    root = tmp_path_factory.mktemp("serve")
    cfg = {"family": "llama", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 1024, "eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0}
    config_model(cfg, 0).save_pretrained(root / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, root / "m" / f)
    return dgopt.compile({"model": {"path": str(root / "m")}, "target": {"max_seq_len": 1024, "max_batch": 4}},
                         root / "tiny-serve")


@pytest.fixture(scope="module")
def dec(art):
    return dgopt.load(art)


def _start(args: list[str], port: int, timeout: float = 120):
    proc = subprocess.Popen([sys.executable, "-m", "dgopt", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not become healthy")


@pytest.fixture(scope="module")
def server(art):
    port = _free_port()
    proc = _start([str(art), "--max-batch", "4", "--threads", "1"], port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _expected(dec, prompt, n: int) -> tuple[list[int], str]:
    """What `dgopt run` gives for this prompt alone: its tokens, and their text without EOS."""
    ids = dec.generate([dec.encode(prompt) if isinstance(prompt, str) else prompt], max_new_tokens=n).ids[0]
    return ids, dec.decode([t for t in ids if t not in dec.eos])


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_text_stream_multibyte_and_stop(dec):
    text = "# héllo wörld ✓ 日本語 done"
    ids = dec.encode(text)
    ts = TextStream(dec.decode)
    deltas = [ts.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + ts.finish() == dec.decode(ids) == text
    assert any(d == "" for d in deltas[:-1]), "no token split a character: the test proves nothing"
    ts = TextStream(dec.decode, stop=["wörld", "zzz"])
    sent = ""
    for t in ids:
        sent += ts.add(t)
        assert not sent.endswith(("w", "wö", "wör", "wörl"))      # a possible stop prefix is held back
        if ts.stopped:
            break
    assert ts.stopped and sent == "# héllo " and ts.finish() == ""


def test_openai_client_completion_stream_and_models(server, dec, art):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == [art.name]
    want_ids, want_text = _expected(dec, PROMPTS[0], 12)
    r = c.completions.create(model=art.name, prompt=PROMPTS[0], max_tokens=12, extra_body={"return_token_ids": True})
    ch = r.choices[0]
    assert ch.token_ids == want_ids and ch.text == want_text
    assert ch.finish_reason == ("stop" if want_ids[-1] in dec.eos else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(dec.encode(PROMPTS[0])), len(want_ids))
    # streaming, token by token: one chunk per committed token, the same text in the end
    chunks = list(c.completions.create(model=art.name, prompt=PROMPTS[0], max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"return_token_ids": True}))
    toks = [x.choices[0].token_ids for x in chunks if x.choices and x.choices[0].finish_reason is None]
    assert toks == [[t] for t in want_ids]
    assert "".join(x.choices[0].text for x in chunks if x.choices) == want_text
    assert chunks[-2].choices[0].finish_reason == ch.finish_reason and chunks[-1].usage.completion_tokens == 12
    # token-id prompt and echo
    p = dec.encode(PROMPTS[2])
    want_ids, want_text = _expected(dec, p, 8)
    r = c.completions.create(model=art.name, prompt=p, max_tokens=8, echo=True, temperature=0)
    assert r.choices[0].text == PROMPTS[2] + want_text


def test_stop_string_streamed_and_whole(server, dec, art):
    c = _client(server)
    _, full = _expected(dec, PROMPTS[1], 24)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    want = full[:full.index(stop)]
    r = c.completions.create(model=art.name, prompt=PROMPTS[1], max_tokens=24, stop=[stop, "\x00never"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(c.completions.create(model=art.name, prompt=PROMPTS[1], max_tokens=24, stop=stop, stream=True))
    assert "".join(x.choices[0].text for x in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_bad_input_is_a_400_naming_the_field(server, art):
    url = server + "/v1/completions"
    cases = {
        "malformed": (b'{"prompt": ', None),
        "unknown field": ({"prompt": "x", "colour": 1}, "colour"),
        "too long": ({"prompt": list(range(1, 1025))}, "prompt"),
        "max_tokens 0": ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        "max_tokens -3": ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
        "max_tokens past max_seq_len": ({"prompt": [5, 6, 7], "max_tokens": 1022}, "max_tokens"),
        "vocab": ({"prompt": [1, 4096]}, "prompt"),
        "negative id": ({"prompt": [-1]}, "prompt"),
        "temperature": ({"prompt": "x", "temperature": 0.7}, "temperature"),
        "top_p": ({"prompt": "x", "top_p": 0.9}, "top_p"),
        "n": ({"prompt": "x", "n": 2}, "n"),
        "two prompts": ({"prompt": ["a", "b"]}, "prompt"),
        "empty": ({"prompt": []}, "prompt"),
        "type": ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    }
    for name, (body, field) in cases.items():
        r = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == field, (name, err)
        if field:
            assert field in err["message"], (name, err)
    r = httpx.post(url, json={"prompt": "x", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert "0 (or omitted)" in httpx.post(url, json={"prompt": "x", "temperature": 1}).json()["error"]["message"]
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    m = httpx.get(server + "/metrics").text
    for name in ("dgopt_requests_total", "dgopt_generated_tokens_total", "dgopt_tokens_per_second",
                 "dgopt_time_to_first_token_seconds_bucket", "dgopt_request_latency_seconds_bucket",
                 "dgopt_queue_depth", "dgopt_tokens_per_step_bucket", "dgopt_acceptance_rate"):
        assert name in m, name


def test_disconnect_mid_stream_frees_the_row(server, art):
    before = _metric(server, "dgopt_rows_freed_total")
    with httpx.stream("POST", server + "/v1/completions",
                      json={"prompt": "def", "max_tokens": 1000, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while _metric(server, "dgopt_rows_freed_total") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "dgopt_rows_freed_total") == before + 1
    assert _metric(server, 'dgopt_requests_total{outcome="cancelled"}') >= 1
    assert httpx.post(server + "/v1/completions", json={"prompt": "def", "max_tokens": 2}).status_code == 200


def test_concurrent_load_batches_and_matches_sequential(server, dec, art):
    """16 concurrent clients, 48 requests (max_tokens 4..19, text and id prompts, some streamed): every greedy
    response equals its own one-row generate, generate calls held more than one row, and rows joined running
    calls."""
    jobs = [(PROMPTS[i % len(PROMPTS)] if i % 3 else dec.encode(PROMPTS[i % len(PROMPTS)]), 4 + i % 16, i % 4 == 0)
            for i in range(48)]
    want = {i: _expected(dec, p, n)[0] for i, (p, n, _) in enumerate(jobs)}
    calls0, rows0 = _metric(server, "dgopt_batch_size_count"), _metric(server, "dgopt_batch_size_sum")
    joined0 = _metric(server, "dgopt_rows_joined_total")

    def one(i):
        p, n, stream = jobs[i]
        c = _client(server)
        if stream:
            return i, [x.choices[0].token_ids[0] for x in c.completions.create(
                model=art.name, prompt=p, max_tokens=n, stream=True, extra_body={"return_token_ids": True})
                if x.choices[0].token_ids]
        return i, c.completions.create(model=art.name, prompt=p, max_tokens=n,
                                       extra_body={"return_token_ids": True}).choices[0].token_ids

    t = time.monotonic()
    with ThreadPoolExecutor(16) as ex:
        got = dict(ex.map(one, range(len(jobs)), timeout=240))
    assert time.monotonic() - t < 240
    assert got == want
    calls, rows = _metric(server, "dgopt_batch_size_count") - calls0, _metric(server, "dgopt_batch_size_sum") - rows0
    assert rows == 48 and calls < 48, (calls, rows)
    # greedy autoregressive: requests of other lengths joined running calls (continuous batching)
    assert _metric(server, "dgopt_rows_joined_total") > joined0
    assert httpx.get(server + "/health").status_code == 200


def test_a_failing_request_fails_alone(art, dec):
    """A request that makes the runtime raise (injected: a Decoder that fails on one token id, in a call's first rows or
    when it joins a running call) gets a 500; the requests batched with it are retried alone and answer as usual."""
    from dgopt.runtime.decoder import Decoder
    from dgopt.serve import create_app

    failed = []

    class Faulty(Decoder):
        def generate(self, prompts, *a, admit=None, **kw):
            if any(13 in p for p in prompts):
                failed.append(len(prompts))
                raise RuntimeError("injected failure")

            def joining(free):      # a poisoned request that joins the running call fails it there
                rows = admit(free)
                if any(13 in ids for _, ids, _ in rows):
                    failed.append(len(prompts) + len(rows))
                    raise RuntimeError("injected failure")
                return rows
            return super().generate(prompts, *a, admit=joining if admit else None, **kw)

    app = create_app(Faulty(art), max_batch=4)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            bodies = [{"prompt": [5, 6, 7], "max_tokens": 40}] + \
                     [{"prompt": p, "max_tokens": 6, "return_token_ids": True} for p in ([1, 2], [13, 14], [3])] + \
                     [{"prompt": [13], "max_tokens": 6, "stream": True}]
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
    try:
        rs = asyncio.run(go())
    finally:
        app.state.server.batcher.close()
    assert [r.status_code for r in rs[:4]] == [200, 200, 500, 200]
    assert "injected failure" in rs[2].json()["error"]["message"]
    for r, p in ((rs[1], [1, 2]), (rs[3], [3])):
        assert r.json()["choices"][0]["token_ids"] == dec.generate([p], max_new_tokens=6).ids[0]
    events = [line for line in rs[4].text.splitlines() if line.startswith("data: ")]
    assert "injected failure" in json.loads(events[0][6:])["error"]["message"] and events[-1] == "data: [DONE]"
    assert max(failed) > 1 and min(failed) == 1       # a batch failed, then its poisoned rows alone


def test_ray_serve_two_replicas(art, dec, monkeypatch):
    ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'dgopt[serve-ray]')")
    # Ray Serve gives its HTTP proxy 3 readiness checks of 5 s, then stops: on 2 busy cores the proxy's start alone
    # takes longer (seen while a training run shared the machine). Ray's processes inherit this environment.
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    from ray import serve
    from dgopt.serve.ray import build
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(str(art), replicas=2, threads=1, num_cpus=0.5), name="dgopt", route_prefix="/")
        reps = serve.status().applications["dgopt"].deployments["dgopt"].replica_states
        assert reps.get("RUNNING") == 2, reps
        c = _client(f"http://127.0.0.1:{port}")
        with ThreadPoolExecutor(6) as ex:
            got = list(ex.map(lambda p: c.completions.create(model=art.name, prompt=p, max_tokens=6,
                                                             extra_body={"return_token_ids": True}),
                              PROMPTS[:6], timeout=120))
        assert [g.choices[0].token_ids for g in got] == [_expected(dec, p, 6)[0] for p in PROMPTS[:6]]
        chunks = list(c.completions.create(model=art.name, prompt=PROMPTS[0], max_tokens=6, stream=True))
        assert "".join(x.choices[0].text for x in chunks) == _expected(dec, PROMPTS[0], 6)[1]
    finally:
        serve.shutdown()
        ray.shutdown()


def test_sampled_artifact_seeds_and_compiled_parameters(artifacts):
    """A sampling artifact (no tokenizer): a seeded request runs in its own call and equals generate(seed=s);
    restating the compiled temperature / top_k is fine, other values are a 400 naming the compiled value; text
    prompts and stop strings need a tokenizer."""
    from dgopt.serve import create_app
    art = artifacts("llama", sampling={"kind": "sample", "temperature": 0.8, "top_k": 40})
    app = create_app(art, max_batch=4)
    dec = app.state.server.dec
    p = [5, 17, 42, 99, 3]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            post = lambda **b: c.post("/v1/completions", json={"prompt": p, "max_tokens": 8,  # noqa: E731
                                                                "return_token_ids": True, **b})
            seeded = await asyncio.gather(*(post(seed=s, temperature=0.8, top_k=40) for s in (1, 2, 1, 3)))
            bad = [await post(temperature=1.0), await post(top_k=5), await post(prompt="text"),
                   await post(stop="x")]
            unseeded = await asyncio.gather(*(post() for _ in range(4)))
            return seeded, bad, unseeded
    try:
        seeded, bad, unseeded = asyncio.run(go())
    finally:
        app.state.server.batcher.close()
    got = [r.json()["choices"][0]["token_ids"] for r in seeded]
    assert got == [dec.generate([p], max_new_tokens=8, seed=s).ids[0] for s in (1, 2, 1, 3)]
    assert got[0] == got[2] and got[0] != got[1]
    assert [r.status_code for r in bad] == [400] * 4
    assert [r.json()["error"]["param"] for r in bad] == ["temperature", "top_k", "prompt", "stop"]
    assert "0.8" in bad[0].json()["error"]["message"] and "40" in bad[1].json()["error"]["message"]
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == "" for r in unseeded)
    assert len({tuple(r.json()["choices"][0]["token_ids"]) for r in unseeded}) > 1    # fresh noise per call


def test_cli_bad_input(art, tmp_path, capsys):
    from dgopt.cli import main
    for args, field in (([str(tmp_path / "nowhere")], "nowhere"), ([str(art), "--max-batch", "9"], "--max-batch"),
                        ([str(art), "--max-batch", "0"], "--max-batch"), ([str(art), "--replicas", "2"], "--replicas"),
                        ([str(art), "--stream-interval", "-5"], "--stream-interval")):
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and field in err and len(err.strip().splitlines()) == 1, err


def test_a_failed_batch_does_not_splice_two_samples():
    """After a batch fails mid-call, greedy rows are retried alone without resending their first tokens (a retry
    repeats them); an unseeded sampled row that already got tokens fails instead: a retry draws another sample, and
    its tail behind the first sample's head would be neither."""
    from types import SimpleNamespace

    from dgopt.serve.batcher import Batcher, Job

    class Dec:      # the batch call commits one token per row, then fails; a one-row call succeeds
        eos, max_batch = set(), 8

        def generate(self, prompts, max_new_tokens, seed, on_token, should_stop, admit=None, on_done=None):
            on_token([101] * len(prompts))
            if len(prompts) > 1:
                raise RuntimeError("injected failure")
            on_token([102])
            return SimpleNamespace(stats={"stop": ["max_new_tokens"]})

    got = {}
    def sink(name):
        return lambda kind, v: got.setdefault(name, []).append((kind, v))
    b = object.__new__(Batcher)
    b.dec, b.on_batch, b.continuous, b._arrivals, b._ended_at = Dec(), None, True, 0, 0
    b._call([Job([1], 2, sink("greedy")), Job([2], 2, sink("sampled"), sampled=True)])
    assert got["greedy"] == [("token", 101), ("token", 102), ("end", "length")]
    assert [k for k, _ in got["sampled"]] == ["token", "error"]
