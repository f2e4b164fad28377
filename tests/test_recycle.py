"""Strategy recycle (RecycleGPT, EAGLE-style lossless): token-identical to transformers' greedy generate whatever
the module proposes (a random module that almost never agrees, and one trained for a few seconds on the tiny target
that often does), batch 1 and batch 4, -O0 and -O2; bad inputs are one-line errors naming the field."""
import json

import pytest
import torch

import dgopt
from conftest import PROMPTS, hf_greedy, hf_model, random_past, step_outputs, tiny_spec
from dgopt.errors import DgoptError
from dgopt.models import recycle as R

NEW = 40


def _train_briefly(module, target, steps: int):
    """A few optimizer steps of the real chain loss on the target's own greedy continuations of PROMPTS (seconds;
    a module of a random tiny target generalises little beyond the text it saw)."""
    from dgopt.training.recycle import _teacher, chain_loss
    frozen = R.Frozen(target)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    rows = [torch.tensor([p + hf_greedy(target, p, NEW)]) for p in PROMPTS]
    for i in range(steps):
        x = rows[i % len(rows)]
        hn, logp = _teacher(target, x)
        loss = chain_loss(module, frozen, x, hn, logp, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("recycle")
    target = hf_model("llama")
    sha = R.target_hash(target)
    out = {}
    for name, steps in (("random", 0), ("trained", 60)):
        m = _train_briefly(R.new_module(64, 96, seed=1), target, steps)
        R.save(m, root / name, "tiny llama", sha)
        out[name] = root / name
    # the trained module with a draft vocabulary: the tokens the target writes for PROMPTS (and nothing else)
    m, cfg = R.load(out["trained"])
    vocab = sorted({t for p in PROMPTS for t in hf_greedy(target, p, NEW)})
    R.save(m, root / "subset", "tiny llama", sha, {"draft_vocab": vocab})
    out["subset"] = root / "subset"
    other = hf_model("llama", seed=1)
    R.save(R.new_module(64, 96), root / "other", "tiny llama seed 1", R.target_hash(other))
    out["other"] = root / "other"
    return out


@pytest.fixture(scope="module")
def refs():
    m = hf_model("llama")
    return [hf_greedy(m, p, NEW) for p in PROMPTS]


def compile_recycle(tmp_path, module_dir, k=4, opt_level=2, disable=(), **sampling):
    spec = tiny_spec("llama", strategy={"kind": "recycle", "k": k}, recycle={"path": str(module_dir)})
    if sampling:
        spec["sampling"] = sampling
    return dgopt.load(dgopt.compile(spec, tmp_path / f"recycle-{module_dir.name}-{k}-{opt_level}-{len(disable)}",
                                    opt_level=opt_level, disable=list(disable)))


@pytest.mark.parametrize("name", ["random", "trained", "subset"])
def test_greedy_exact_batch1_and_batch4(name, modules, refs, tmp_path):
    dec = compile_recycle(tmp_path, modules[name])
    if name == "subset":    # the chain's head reads the draft vocabulary's columns only
        import onnx
        heads = [t for t in onnx.load(str(dec.path / "step.onnx")).graph.initializer if t.name == "recycle/lm_head"]
        assert list(heads[0].dims)[1] == len(json.loads((modules[name] / "recycle.json").read_text())["draft_vocab"])
    for p, ref in zip(PROMPTS, refs):
        assert dec.generate(p, max_new_tokens=NEW).ids[0] == ref
    res = dec.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert res.ids == refs[:4]
    rate = res.stats["acceptance_rate"]
    if name == "random":
        assert rate < 0.2
    else:       # the chain must agree often, or this test would not exercise multi-token acceptance
        assert rate > 0.3 and len(res.stats["accepted_hist"]) > 2, res.stats


@pytest.mark.parametrize("k,name", [(1, "trained"), (3, "trained"), (3, "subset")])
def test_O0_equals_O2(k, name, modules, refs, tmp_path):
    d0 = compile_recycle(tmp_path, modules[name], k, 0)
    d2 = compile_recycle(tmp_path, modules[name], k, 2)
    # -O0 keeps the chain's textbook softmax -> argmax; -O2 removes the softmaxes
    assert (d0.path / "ir.yaml").read_text().count("op: softmax") == k
    assert (d2.path / "ir.yaml").read_text().count("op: softmax") == 0
    # -O2 also fuses the chain into one node (lowered in the module's own shapes and draft vocabulary)
    assert (d0.path / "ir.yaml").read_text().count("op: recycle_step") == k
    assert (d2.path / "ir.yaml").read_text().count("op: recycle_chain") == 1
    r0, r2 = d0.generate(PROMPTS, max_new_tokens=NEW), d2.generate(PROMPTS, max_new_tokens=NEW)
    assert r0.ids == r2.ids == refs
    assert r0.stats["accepted_hist"] == r2.stats["accepted_hist"]


HEURISTIC = {"kind": "recycle", "k": 2, "k_schedule": "heuristic", "k_max": 6}


@pytest.mark.parametrize("name", ["random", "trained", "subset"])
def test_heuristic_k_exact_and_adapting(name, modules, refs, tmp_path):
    """k_schedule heuristic: the chain is a loop of draft_k steps, k moves per step (k + 2 after a step whose rows
    all accepted all, else k - 1, within 1..k_max) and the output stays token-identical to transformers' greedy,
    batch 1 and 4, at -O0 and -O2 (the same tokens and accepted lengths)."""
    spec = tiny_spec("llama", strategy=HEURISTIC, recycle={"path": str(modules[name])})
    d2 = dgopt.load(dgopt.compile(spec, tmp_path / "h2"))
    d0 = dgopt.load(dgopt.compile(spec, tmp_path / "h0", opt_level=0))
    assert (d2.path / "ir.yaml").read_text().count("op: recycle_loop") == 1 and "draft_k" in d2.session.inputs
    for p, ref in zip(PROMPTS, refs):
        r2 = d2.generate(p, max_new_tokens=NEW)
        r0 = d0.generate(p, max_new_tokens=NEW)
        assert r2.ids[0] == r0.ids[0] == ref and r2.stats["accepted_hist"] == r0.stats["accepted_hist"]
    res = d2.generate(PROMPTS[:4], max_new_tokens=NEW)
    assert res.ids == refs[:4]
    one = d2.generate(PROMPTS[0], max_new_tokens=NEW).stats
    if name == "random":    # nothing accepted: k falls to 1 (mean below the first step's 2)
        assert one["mean_k"] < 2
    else:                   # k grew past its start: more than k + 1 = 3 tokens accepted in some step
        assert max(int(a) for a in one["accepted_hist"]) > 3 and one["mean_k"] > 2, one


def test_draft_vocabulary_in_any_order(modules, refs, tmp_path):
    """A recycle.json whose draft vocabulary is unsorted and repeats an id compiles at -O0 and -O2 and proposes
    what the sorted one does (the fused chain maps its argmax back through the vocabulary; step_weights sorts it so
    that even a tie picks the first maximum of the whole row)."""
    m, cfg = R.load(modules["subset"])
    vocab = cfg["draft_vocab"][::-1] + cfg["draft_vocab"][:1]
    R.save(m, tmp_path / "shuffled", "tiny llama", R.target_hash(hf_model("llama")), {"draft_vocab": vocab})
    want = compile_recycle(tmp_path, modules["subset"], 3).generate(PROMPTS, max_new_tokens=NEW)
    for lvl in (0, 2):
        got = compile_recycle(tmp_path, tmp_path / "shuffled", 3, lvl).generate(PROMPTS, max_new_tokens=NEW)
        assert got.ids == refs and got.stats["accepted_hist"] == want.stats["accepted_hist"]


def test_sampled_O0_equals_O2(modules, tmp_path):
    """-O2's passes must not change a sampled step either: the same seed gives the same tokens at -O0 and -O2, and
    another seed other tokens; but for fuse_draft_top_k_sampling, which is exact in distribution only (the chain
    draws from its top-k in descending order: the chi-square test below runs -O2 with it)."""
    d0 = compile_recycle(tmp_path, modules["trained"], 3, 0, **SAMPLING)
    d2 = compile_recycle(tmp_path, modules["trained"], 3, 2, disable=("fuse_draft_top_k_sampling",), **SAMPLING)
    assert "sample_top_k" not in (d2.path / "ir.yaml").read_text()
    r0 = d0.generate(PROMPTS[:3], max_new_tokens=NEW, seed=7)
    assert r0.ids == d2.generate(PROMPTS[:3], max_new_tokens=NEW, seed=7).ids
    assert r0.ids != d2.generate(PROMPTS[:3], max_new_tokens=NEW, seed=8).ids


@pytest.mark.parametrize("strategy", [{"kind": "recycle", "k": 4}, HEURISTIC], ids=["k4", "heuristic"])
def test_max_seq_len_and_repetition_penalty(strategy, modules, tmp_path):
    m = hf_model("llama")
    spec = tiny_spec("llama", strategy=strategy, recycle={"path": str(modules["trained"])},
                     sampling={"repetition_penalty": 1.3}, target={"max_seq_len": 30})
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "pen"))
    for p in PROMPTS[:3]:
        got = dec.generate(p, max_new_tokens=NEW).ids[0]
        assert got == hf_greedy(m, p, 30 - len(p), repetition_penalty=1.3)


def test_draft_max_batch_falls_back_to_autoregressive(modules, refs, tmp_path):
    """strategy.draft_max_batch: a call of more rows runs the nested autoregressive artifact, a smaller one recycles;
    both token-identical to transformers' greedy. The nested files are hash-checked with the rest."""
    spec = tiny_spec("llama", strategy={"kind": "recycle", "k": 3, "draft_max_batch": 2},
                     recycle={"path": str(modules["trained"])})
    art = dgopt.compile(spec, tmp_path / "fb")
    dec = dgopt.load(art)
    assert dec.manifest["fallback"] == {"dir": "autoregressive", "above_batch": 2}
    small, big = dec.generate(PROMPTS[:2], max_new_tokens=NEW), dec.generate(PROMPTS, max_new_tokens=NEW)
    assert small.ids == refs[:2] and big.ids == refs
    assert "fallback" not in small.stats and small.stats["accepted_hist"]
    assert big.stats["fallback"] == "autoregressive" and big.stats["tokens_per_step"] == 1.0
    # no room above the limit: no nested artifact
    spec["strategy"]["draft_max_batch"] = 8
    spec["target"]["max_batch"] = 8
    assert "fallback" not in dgopt.load(dgopt.compile(spec, tmp_path / "nofb")).manifest
    man = json.loads((art / "manifest.json").read_text())
    for bad in ({"dir": "..", "above_batch": 2}, {"dir": "autoregressive"}, "autoregressive"):
        (art / "manifest.json").write_text(json.dumps({**man, "fallback": bad}))
        with pytest.raises(DgoptError, match="corrupt manifest: fallback"):
            dgopt.load(art)
    (art / "manifest.json").write_text(json.dumps(man))
    step = art / "autoregressive" / "step.onnx"
    step.write_bytes(step.read_bytes()[:-1] + b"\0")
    with pytest.raises(DgoptError, match="autoregressive/step.onnx"):
        dgopt.load(art)
    spec["target"].update(backend="tensorrt", device="cuda")
    with pytest.raises(DgoptError, match="strategy.draft_max_batch"):     # the fallback is an onnx artifact
        dgopt.compile(spec, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_tune_tries_recycle_k_and_writes_compilable_specs(modules, tmp_path):
    """dgopt tune on a recycle spec (injected timings): it tries k and writes the winner with its module; when
    autoregressive wins, the written spec drops the module (a recycle section needs strategy recycle)."""
    import yaml
    from dgopt.spec import load_spec
    from dgopt.tune import Measured, tune
    spec = tiny_spec("llama", strategy={"kind": "recycle", "k": 4}, recycle={"path": str(modules["trained"])})
    flat = {q: 1.0 for q in (1, 2, 4, 8, 16, 32, 64)}
    for ratios, want in (({"recycle k2": 1.4, "recycle k3": 1.2}, "recycle k2"), ({}, "autoregressive")):
        calls = []

        def measure(c, dec, prompts, batch, ratios=ratios, calls=calls):
            calls.append(c.name)
            r = ratios.get(c.name, 0.5)
            return Measured(c, 100.0 * r, r, 2.0, 10.0)
        out = tmp_path / f"{want}.yaml"
        rep = tune(spec, out, progress=False, measure=measure, cost=lambda dec: flat, plot=None)
        assert rep.chosen.name == want and {"recycle k1", "recycle k4", "recycle k6", "recycle heuristic k3..8"} \
            <= set(calls)
        written = yaml.safe_load(out.read_text())
        assert ("recycle" in written) == (want != "autoregressive")
        dec = dgopt.load(dgopt.compile(load_spec(out), tmp_path / f"art-{want}"))
        assert dec.generate(PROMPTS[0], max_new_tokens=NEW).ids[0] == hf_greedy(hf_model("llama"), PROMPTS[0], NEW)


def _err(spec, tmp_path) -> str:
    with pytest.raises(DgoptError) as e:
        dgopt.compile(spec, tmp_path / "bad")
    msg = str(e.value)
    assert "\n" not in msg and not (tmp_path / "bad").exists()
    return msg


def test_bad_inputs(modules, tmp_path):
    st = {"kind": "recycle", "k": 4}
    msg = _err(tiny_spec("llama", strategy=st), tmp_path)
    assert "'recycle'" in msg and "needs a recyclable module" in msg
    msg = _err(tiny_spec("llama", strategy=st, recycle={"path": str(tmp_path / "nope")}), tmp_path)
    assert "recycle.path" in msg and "not found" in msg
    msg = _err(tiny_spec("llama", strategy=st, recycle={"path": str(modules["other"])}), tmp_path)
    assert "recycle.path" in msg and "tiny llama seed 1" in msg and "this spec's model" in msg
    msg = _err(tiny_spec("llama", strategy={"kind": "lookahead", "verify": False}), tmp_path)
    assert "strategy.verify" in msg
    msg = _err(tiny_spec("llama", strategy={**st, "verify": False}, recycle={"path": str(modules["random"])},
                         sampling=SAMPLING), tmp_path)
    assert "strategy.verify" in msg and "greedy only" in msg
    msg = _err(tiny_spec("llama", strategy=HEURISTIC, recycle={"path": str(modules["random"])}, sampling=SAMPLING),
               tmp_path)
    assert "strategy.k_schedule" in msg and "greedy only" in msg
    msg = _err(tiny_spec("llama", strategy={**HEURISTIC, "verify": False}, recycle={"path": str(modules["random"])}),
               tmp_path)
    assert "k_schedule heuristic with recycle needs verify: true" in msg
    cfg = json.loads((modules["subset"] / "recycle.json").read_text())
    bad = tmp_path / "badvocab"
    bad.mkdir()
    (bad / "recycle.safetensors").write_bytes((modules["subset"] / "recycle.safetensors").read_bytes())
    (bad / "recycle.json").write_text(json.dumps({**cfg, "draft_vocab": [1, 2, 320]}))
    msg = _err(tiny_spec("llama", strategy=st, recycle={"path": str(bad)}), tmp_path)
    assert "recycle.path" in msg and "draft_vocab" in msg and "below 320" in msg
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "recycle.json").write_text(json.dumps({"hidden_size": 64}))
    msg = _err(tiny_spec("llama", strategy=st, recycle={"path": str(tmp_path / "broken")}), tmp_path)
    assert "recycle.path" in msg and "not a recycle module" in msg


SAMPLING = {"kind": "sample", "temperature": 0.8, "top_k": 6}
SPROMPT = [5, 17, 42, 99]


def _exact_three(model):
    """The exact joint of the first three sampled tokens after SPROMPT, with transformers' own warpers."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    def dist(ids):
        with torch.no_grad():
            lg = model(torch.tensor([ids])).logits[:, -1]
        lg = TopKLogitsWarper(SAMPLING["top_k"])(None, TemperatureLogitsWarper(SAMPLING["temperature"])(None, lg))
        return torch.softmax(lg.double(), -1)[0]

    def support(p):
        return [(i, p[i].item()) for i in torch.nonzero(p).flatten().tolist()]
    joint = {}
    for a, pa in support(dist(SPROMPT)):
        for b, pb in support(dist(SPROMPT + [a])):
            for c, pc in support(dist(SPROMPT + [a, b])):
                joint[(a, b, c)] = pa * pb * pc
    return joint


@pytest.mark.parametrize("name", ["trained", "subset"])
def test_sampling_matches_target_distribution(name, modules, tmp_path):
    """Three tokens: the first step verifies the prefill's point-mass guesses, later ones the module's draws against
    its q; the 3-token joint covers both (chi-square, 10,000 draws, fixed seeds). subset: q is zero outside the
    draft vocabulary, which rejection sampling must make up for."""
    from conftest import chi2_pvalue
    B, calls = 500, 20
    spec = tiny_spec("llama", strategy={"kind": "recycle", "k": 3}, recycle={"path": str(modules[name])},
                     sampling=SAMPLING, target={"max_batch": B})
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "sampled"))
    assert (dec.path / "ir.yaml").read_text().count("op: sample_top_k") == 3      # the chain's fused draws
    counts, acc = {}, []
    for seed in range(calls):
        res = dec.generate([SPROMPT] * B, max_new_tokens=3, seed=seed)
        acc.append(res.stats["acceptance_rate"])
        for t in res.ids:
            counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    assert chi2_pvalue(counts, _exact_three(hf_model("llama"))) > 1e-3
    assert 0.05 < sum(acc) / len(acc) < 0.95, acc     # accepted and rejected proposals both occur


def test_train_self_data_without_tokenizer(tmp_path):
    """`dgopt train recycle --data self` on a model dir without tokenizer files: the target writes its own rows; the
    module is saved with the target's hash and its training record, and compiles against that target."""
    from dgopt.cli import main as cli

    def main(args):
        return cli(["train", "recycle", *args])
    hf_model("llama").save_pretrained(tmp_path / "target")
    assert main([str(tmp_path / "target"), "-o", str(tmp_path / "mod"), "--data", "self", "--minutes", "5",
                 "--max-steps", "3", "--gen-rows", "8", "--val-rows", "4", "--eval-every", "2", "--batch", "4",
                 "--draft-vocab", "16", "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "mod" / "recycle.json").read_text())
    assert cfg["target_sha"] == R.target_hash(hf_model("llama")) and cfg["training"]["data"] == ["self"]
    assert len(cfg["draft_vocab"]) == 16 and cfg["draft_vocab"] == sorted(cfg["draft_vocab"])
    spec = tiny_spec("llama", strategy={"kind": "recycle", "k": 2}, recycle={"path": str(tmp_path / "mod")})
    spec["model"] = {"path": str(tmp_path / "target")}
    assert dgopt.load(dgopt.compile(spec, tmp_path / "art")).manifest["recycle"]["draft_vocab_size"] == 16
    assert cfg["training"]["steps"] > 0 and 0.0 <= cfg["training"]["val_agreement"] <= 1.0
    assert main([str(tmp_path / "target"), "-o", str(tmp_path / "m2"), "--data", "stdlib"]) == 2   # no tokenizer
    assert main([str(tmp_path / "target"), "-o", str(tmp_path / "m2"), "--data", "self", "--draft-vocab", "-1"]) == 2
    assert not (tmp_path / "m2").exists()


def _lossy_reference(target, module, prompt: list[int], k: int, new: int) -> list[int]:
    """RecycleGPT's unverified mode written out in torch, recomputing the whole sequence each step: the prefill
    verifies k guesses drawn from the prompt (as the runtime draws them) and commits the accepted ones and the
    target's next token; from then on each step commits the module's k-token chain (started from the target's
    hidden state at the last position it computed, and the token it chose there) unverified, then the target's
    argmax after them."""
    from dgopt.runtime.strategies.base import initial_guesses
    frozen = R.Frozen(target)
    guesses = initial_guesses([prompt], k)[0].tolist()
    seq = list(prompt)
    with torch.no_grad():
        hn = target.model(input_ids=torch.tensor([seq + guesses])).last_hidden_state[0]
        pred = frozen.head(hn).argmax(-1).tolist()[len(prompt) - 1:]
        m = 0
        while m < k and guesses[m] == pred[m]:
            m += 1
        seq += guesses[:m] + [pred[m]]
        h, tok = hn[len(prompt) - 1 + m][None], torch.tensor([pred[m]])
        while len(seq) - len(prompt) < new:
            chain = []
            for _ in range(k):
                h, logits = frozen.step(module, h, tok)
                tok = logits.argmax(-1)
                chain.append(int(tok))
            hn = target.model(input_ids=torch.tensor([seq + chain])).last_hidden_state[0]
            seq += chain + [int(frozen.head(hn[-1]).argmax())]
            h, tok = hn[-1][None], torch.tensor([seq[-1]])
    return seq[len(prompt):len(prompt) + new]


@pytest.mark.parametrize("k", [1, 3])
def test_lossy_mode_follows_its_rule(k, modules, refs, tmp_path):
    """verify: false commits k module tokens and the target's next token per forward, exactly as the reference
    rule does (batch 1 and 4); with the random module that output is not greedy's (the mode is lossy, and a test
    that could not tell would be worthless)."""
    target = hf_model("llama")
    for name in ("trained", "random"):
        module, _ = R.load(modules[name])
        spec = tiny_spec("llama", strategy={"kind": "recycle", "k": k, "verify": False},
                         recycle={"path": str(modules[name])})
        dec = dgopt.load(dgopt.compile(spec, tmp_path / f"lossy-{name}-{k}"))
        want = [_lossy_reference(target, module, p, k, NEW) for p in PROMPTS[:4]]
        one = [dec.generate(p, max_new_tokens=NEW) for p in PROMPTS[:4]]
        assert [r.ids[0] for r in one] == want
        assert dec.generate(PROMPTS[:4], max_new_tokens=NEW).ids == want
        assert one[0].stats["lossy"] and set(one[0].stats["accepted_hist"]) - {str(a) for a in range(1, k + 2)} \
            == set() and one[0].stats["accepted_hist"][str(k + 1)] >= NEW // (k + 1) - 2
        if name == "random":
            assert want != refs[:4]


def test_qwen2_target(tmp_path):
    """A Qwen2 target (attention biases, its own norm class): a module trained briefly on it, greedy token-identical
    to transformers at batch 1 and 3."""
    target = hf_model("qwen2")
    module = _train_briefly(R.new_module(64, 96, seed=2), target, 30)
    R.save(module, tmp_path / "mod", "tiny qwen2", R.target_hash(target))
    spec = tiny_spec("qwen2", strategy={"kind": "recycle", "k": 3}, recycle={"path": str(tmp_path / "mod")})
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "art"))
    want = [hf_greedy(target, p, NEW) for p in PROMPTS[:3]]
    assert [dec.generate(p, max_new_tokens=NEW).ids[0] for p in PROMPTS[:3]] == want
    res = dec.generate(PROMPTS[:3], max_new_tokens=NEW)
    assert res.ids == want and res.stats["acceptance_rate"] > 0.1, res.stats


@pytest.mark.parametrize("verify,sampled,loop", [(True, False, False), (False, False, False), (True, True, False),
                                                 (True, False, True)], ids=["greedy", "lossy", "sampled", "loop"])
def test_step_equals_reference_interpreter(verify, sampled, loop, modules, tmp_path):
    """One lowered step (the target's verify forward with its hidden states, acceptance or the lossy rule, the
    module's chain over a draft vocabulary) against the reference interpreter running the same IR with the torch
    module: the same accepted lengths, tokens and proposals, the same cache. Sampled: the -O2 chain draws with
    sample_top_k, lowered over the draft vocabulary's own scores; the same draws and q as the reference's over the
    scattered [B, V] row. loop (k_schedule heuristic): the chain an ONNX Loop whose length the step sets from its
    own acceptance: K - 1 = 2 when a row rejected, and with every row accepting all, K + 2 = 5 capped by draft_k 4."""
    import numpy as np
    import yaml

    from dgopt.backends.reference import run_graph
    from dgopt.ir import graph_from_dict
    from dgopt.models.hf import load_model
    from dgopt.spec import spec_from_dict
    K, B, P = 3, 3, 0       # no past: the x token is the whole context, so the target's chain is known
    strategy = {**HEURISTIC, "k": K} if loop else {"kind": "recycle", "k": K, "verify": verify}
    spec = tiny_spec("llama", strategy=strategy, recycle={"path": str(modules["subset"])},
                     **({"sampling": SAMPLING} if sampled else {}))
    dec = dgopt.load(dgopt.compile(spec, tmp_path / "a"))
    if sampled:
        assert (dec.path / "ir.yaml").read_text().count("op: sample_top_k") == K
    lm = load_model(spec_from_dict(tiny_spec("llama")).model, lambda p: p)
    r = np.random.default_rng(3)
    x = r.integers(0, 320, (B, 1))
    cands = np.array([[hf_greedy(lm.model, [int(t)], K)] for t in x[:, 0]])    # the target's own chain: all agree
    cands[1, 0, 1] = (cands[1, 0, 1] + 1) % 320                                   # row 1: one agrees
    cands[2, 0, 0] = (cands[2, 0, 0] + 1) % 320                                   # row 2: none
    feeds = {"verify_ids": np.concatenate([x, cands[:, 0]], 1), "candidates": cands,
             "verify_position_ids": np.arange(P, P + K + 1)[None].repeat(B, 0),
             "verify_mask": np.zeros((B, 1, K + 1, P + K + 1), np.float32)}
    feeds["verify_mask"][:, :, :, P:] = np.where(np.tril(np.ones((K + 1, K + 1))) > 0, 0, np.finfo(np.float32).min)
    if not verify:
        feeds["trusted"] = np.array([0, K, 1])
    if loop:
        feeds["draft_k"], feeds["active_rows"] = np.array(5, np.int64), np.ones(B, np.int64)
    if sampled:
        q = r.random((B, K, 320)).astype(np.float32)
        feeds.update(draft_probs=q / q.sum(-1, keepdims=True), accept_uniform=r.random((B, K + 1)).astype(np.float32),
                     **{f"draft_uniform_{i}": r.random(B).astype(np.float32) for i in range(K)})
    s = dec.session
    feeds.update(random_past(s, B, P, r))
    got = step_outputs(s, feeds)
    g = graph_from_dict(yaml.safe_load((dec.path / "ir.yaml").read_text())["graph"])
    module, cfg = R.load(modules["subset"])
    models = {"target": lm, "recycle": {"module": module, "frozen": R.Frozen(lm.model), "vocab": cfg["draft_vocab"]}}
    tfeeds = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items() if not k.startswith("past")}
    tfeeds["past"] = [torch.from_numpy(feeds[t]) for t in s.past["tensors"]]
    ref = run_graph(g, tfeeds, models)
    for name in ("accept_len", "accept_tokens", "proposals"):
        assert got[name].tolist() == ref[name].tolist(), name
    assert got["proposals"].shape == (B, K - 1 if loop else K)
    if sampled:
        np.testing.assert_allclose(got["proposal_probs"], ref["proposal_probs"].numpy(), atol=1e-5)
        assert (got["proposal_probs"] > 0).sum(-1).max() <= SAMPLING["top_k"]
    elif verify:
        assert got["accept_len"].tolist() == [K + 1, 2, 1]
    else:       # trusted 0 (verified), K (all of row 1's proposals, the wrong one too), 1 (row 2's first)
        assert got["accept_len"].tolist() == [K + 1, K + 1, 2]
    np.testing.assert_allclose(got["present.1.key"], ref["present"][2].numpy(), atol=1e-4)
    if loop:        # every row accepts all: K + 2, capped
        c = np.array([[hf_greedy(lm.model, [int(t)], K)] for t in x[:, 0]])
        feeds.update(verify_ids=np.concatenate([x, c[:, 0]], 1), candidates=c, draft_k=np.array(4, np.int64))
        got = step_outputs(s, feeds)
        tfeeds.update({k: torch.from_numpy(np.asarray(feeds[k])) for k in ("verify_ids", "candidates", "draft_k")})
        ref = run_graph(g, tfeeds, models)
        assert got["accept_len"].tolist() == [K + 1] * B and got["proposals"].shape == (B, 4)
        assert got["proposals"].tolist() == ref["proposals"].tolist()
        # row 2 rejects, but it has finished: the others decide (K + 2, capped)
        c[2, 0, 0] = (c[2, 0, 0] + 1) % 320
        feeds.update(verify_ids=np.concatenate([x, c[:, 0]], 1), candidates=c, active_rows=np.array([1, 1, 0]))
        tfeeds.update({k: torch.from_numpy(np.asarray(feeds[k])) for k in ("verify_ids", "candidates", "active_rows")})
        got, ref = step_outputs(s, feeds), run_graph(g, tfeeds, models)
        assert got["accept_len"].tolist() == [K + 1, K + 1, 1] and got["proposals"].shape == (B, 4)
        assert got["proposals"].tolist() == ref["proposals"].tolist()
        feeds["active_rows"] = np.ones(B, np.int64)                       # running: it shortens the chain
        assert step_outputs(s, feeds)["proposals"].shape == (B, K - 1)


def test_inspect_and_run_say_lossy(modules, tmp_path, capsys):
    """dgopt inspect shows the module (its draft vocabulary) and marks verify: false LOSSY; so does dgopt run."""
    from dgopt.cli import main
    spec = tiny_spec("llama", strategy={"kind": "recycle", "k": 2, "verify": False},
                     recycle={"path": str(modules["subset"])})
    art = dgopt.compile(spec, tmp_path / "lossy")
    assert main(["inspect", str(art), "--no-browser"]) == 0
    seen = capsys.readouterr()
    out = " ".join((seen.out + seen.err).split())
    assert "LOSSY" in out and "draft vocabulary" in out and "trained for tiny llama" in out
    assert main(["run", str(art), "--ids", "5,17,42", "--max-new-tokens", "6"]) == 0
    seen = capsys.readouterr()
    assert "LOSSY" in " ".join((seen.out + seen.err).split())
