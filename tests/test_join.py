"""Continuous batching in the one decode loop: rows that join a running greedy call (at a finished row's place or
as new rows, their prompt prefilled beside the running rows' next token) generate exactly what they generate alone,
and the running rows are not disturbed; on_done reports each row as it ends."""
import pytest

import dgopt
from conftest import PROMPTS, hf_greedy, hf_model, tiny_spec
from dgopt.runtime.loop import generate

NEW = 24


@pytest.fixture(scope="module")
def ar(tmp_path_factory):
    spec = tiny_spec("llama", sampling={"repetition_penalty": 1.2}, target={"max_seq_len": 64, "max_batch": 4})
    return dgopt.load(dgopt.compile(spec, tmp_path_factory.mktemp("join") / "ar"))


def test_rows_join_a_running_call(ar):
    m = hf_model("llama")
    want = {i: hf_greedy(m, p, NEW if i != 2 else 6, repetition_penalty=1.2) for i, p in enumerate(PROMPTS)}
    # step -> requests that arrive then (prompt index); row 0 runs from the start, row 1 has a short budget
    arrivals = {3: [1], 5: [2], 14: [3, 4]}
    owner, got, ends, step = {0: 0}, {i: [] for i in want}, {}, [0]

    def on_token(toks):
        for b, t in enumerate(toks):
            if t is not None:
                got[owner[b]].append(t)

    def on_done(b, reason):
        ends[owner[b]] = reason

    def admit(free):
        step[0] += 1
        out = []
        n = len(owner)
        for i in arrivals.get(step[0], []):
            b = free.pop(0) if free else n
            n += b == n
            owner[b] = i
            out.append((b, PROMPTS[i], 6 if i == 2 else NEW))
        return out

    res = generate(ar, [PROMPTS[0]], NEW, on_token=on_token, should_stop=None, admit=admit, on_done=on_done)
    assert got == want
    assert ends == {i: "max_new_tokens" for i in want}
    assert res.stats["joined"] == 4 and res.stats["batch"] == 4     # row 2 ended before 3 and 4 came: one reused
    # the artifact's max_batch bounds the rows
    with pytest.raises(ValueError, match="max_batch"):
        generate(ar, [PROMPTS[0]], NEW, admit=lambda free: [(b, PROMPTS[1], 4) for b in range(1, 5)])


def test_max_seq_len_and_no_joins_for_sampling(ar, tmp_path):
    m = hf_model("llama")
    owner, got, ends = {0: 0}, {0: [], 1: []}, {}
    long_prompt = list(range(3, 60))

    def admit(free):
        if 1 in owner.values():
            return []
        owner[1] = 1
        return [(1, long_prompt, NEW)]

    generate(ar, [PROMPTS[0]], NEW, on_token=lambda toks: [got[owner[b]].append(t) for b, t in enumerate(toks)
                                                          if t is not None],
             admit=admit, on_done=lambda b, r: ends.__setitem__(owner[b], r))
    assert got[1] == hf_greedy(m, long_prompt, 64 - len(long_prompt), repetition_penalty=1.2)
    assert ends == {0: "max_new_tokens", 1: "max_seq_len"}
    # sampled: the noise streams are sized at the start, so a call never asks anyone to join
    dec = dgopt.load(dgopt.compile(tiny_spec("llama", sampling={"kind": "sample"}), tmp_path / "s"))
    asked = []
    generate(dec, [PROMPTS[0]], 5, admit=lambda free: asked.append(free) or [])
    assert asked == []
