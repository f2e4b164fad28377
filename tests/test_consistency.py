"""Consistency training (CLLM): trajectories are exact Jacobi decoding, training cuts the Jacobi steps per block,
bad input gets one-line errors."""
import json

import pytest
import torch

from conftest import TINY, hf_greedy, hf_model
from dgopt.cli import main
from dgopt.training import consistency as cons


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "llama"
    hf_model("llama").save_pretrained(d)        # no tokenizer: --data self must do
    return d


def test_trajectory_fixed_points_are_greedy_generate():
    model = hf_model("llama")
    prompts = torch.tensor([[5, 17, 42, 99, 3], [7, 7, 8, 1, 2], [250, 3, 3, 3, 3]])
    t = cons.jacobi_trajectories(model, prompts, block=4, blocks=3, seed=0)
    for b, p in enumerate(prompts.tolist()):
        assert t.seq[b, 5:].tolist() == hf_greedy(model, p, 12)
    for j, st in enumerate(t.states):       # last state = fixed point = the block of the greedy sequence
        assert torch.equal(st[-1], t.seq[:, 5 + 4 * j:5 + 4 * (j + 1)])
        assert int(t.steps[j].max()) == len(st) - 1 and int(t.steps[j].min()) >= 0


def test_consistency_loss_masks_converged_prefix():
    model = hf_model("llama")
    fixed = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    _, c_same, _ = cons.consistency_loss(model, fixed, fixed.clone(), 4, 1.0)
    assert c_same == 0.0                    # a state equal to the fixed point has nothing to learn
    noisy = fixed.clone()
    noisy[0, 6] = 9
    _, c, _ = cons.consistency_loss(model, fixed, noisy, 4, 1.0)
    assert c > 0


def test_training_reduces_mean_jacobi_steps(tiny_dir, tmp_path):
    info = cons.train(tiny_dir, tmp_path / "out", data=["self"], block=8, minutes=5, samples=32, val_samples=16,
                      prompt_len=8, blocks=2, batch=16, lr=3e-3, ar_weight=0.1, kd_weight=0.0, eval_every=1000,
                      patience=0, max_steps=60, quiet=True, threads=1)
    # 7.7 -> 4.1 steps per block of 8 here (AR-only: ~1 token fixed per step)
    assert info["jacobi_steps_per_block_after"] < info["jacobi_steps_per_block_before"] - 1.5, info
    saved = json.loads((tmp_path / "out" / "dgopt_build.json").read_text())
    assert saved["steps_done"] == 60 and saved["val_ppl_on"] == "held-out self-sampled sequences"
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")     # a loadable model dir


def _err(capsys, argv):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_input_one_line_errors(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert "MODEL_DIR" in _err(capsys, ["train", "consistency", str(tmp_path / "nope"), "-o", str(out)])
    big = TINY["llama"]["max_position_embeddings"] + 1
    assert "--block" in _err(capsys, ["train", "consistency", str(tiny_dir), "-o", str(out), "--data", "self",
                                    "--block", str(big)])
    from transformers import BertConfig, BertForMaskedLM
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(bert)
    assert "not a decoder-only" in _err(capsys, ["train", "consistency", str(bert), "-o", str(out), "--data", "self"])
    assert "no tokenizer" in _err(capsys, ["train", "consistency", str(tiny_dir), "-o", str(out), "--data", "stdlib"])
    for flag, value in (("--kd-weight", "-1"), ("--ar-weight", "-0.5"), ("--kd-batch", "0")):
        assert flag in _err(capsys, ["train", "consistency", str(tiny_dir), "-o", str(out), "--data", "self",
                                     flag, value])
    assert "--kd-len" in _err(capsys, ["train", "consistency", str(tiny_dir), "-o", str(out), "--data", "self",
                                     "--block", "4", "--kd-weight", "1", "--kd-len", str(big)])
    assert not out.exists()                 # nothing half-written


@pytest.mark.parametrize("spec", ["jacobi-cllm.yaml", "lookahead-cllm.yaml"])
def test_shipped_cllm_specs_match_transformers_greedy(spec, tmp_path):
    """Exactness is against the model decoded: Jacobi / lookahead greedy on code-tiny-cllm == transformers greedy
    generate on code-tiny-cllm, batch 1 and a batch."""
    from pathlib import Path

    import dgopt
    from dgopt.training.trainer import model_dir
    from transformers import AutoModelForCausalLM
    path = Path(__file__).resolve().parents[1] / "specs" / spec
    # draft_max_batch 0: the batch runs Jacobi too, not the spec's autoregressive fallback
    dec = dgopt.load(dgopt.compile(path, tmp_path / "art", overrides=["strategy.draft_max_batch=0"]))
    model = AutoModelForCausalLM.from_pretrained(model_dir("code-tiny-cllm"), dtype=torch.float32).eval()
    prompts = [dec.encode(t) for t in ("def __init__(self", "import ", "    for i in range(")]
    refs = [hf_greedy(model, p, 48) for p in prompts]
    assert [dec.generate(p, max_new_tokens=48).ids[0] for p in prompts] == refs
    assert dec.generate(prompts, max_new_tokens=48).ids == refs


def test_kd_loss_is_zero_for_the_original_and_positive_after_a_change():
    model = hf_model("llama")
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(cons.kd_loss(model, model, x)) == pytest.approx(0.0, abs=1e-6)
    import copy
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    assert float(cons.kd_loss(other, model, x)) > 1e-3


def _finetune(kd_weight: float, steps: int = 30):
    """`steps` consistency steps on a random Llama's trajectories, with kd_weight x KL to the original on random
    token windows; returns (KL to the original on held-out windows, consistency loss on the trajectories)."""
    import copy
    orig = hf_model("llama")
    model = copy.deepcopy(orig).train()
    g = torch.Generator().manual_seed(0)
    traj = cons.jacobi_trajectories(orig, torch.randint(0, 256, (16, 8), generator=g), block=8, blocks=2)
    windows, held = torch.randint(0, 256, (64, 24), generator=g), torch.randint(0, 256, (8, 24), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        bt = cons.sample_batch(traj, torch.randperm(16, generator=g), g)
        loss = cons.consistency_loss(model, *bt, 0.0)[0]
        if kd_weight:
            loss = loss + kd_weight * cons.kd_loss(model, orig, windows[torch.randint(0, 64, (8,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float(cons.kd_loss(model, orig, held)), cons.val_loss(model, traj, 16, 0.0)


def test_kd_term_holds_the_model_near_the_original():
    """The same consistency fine-tune with and without the KD term: with it the model stays much closer to the
    original on held-out text, and its consistency loss still falls."""
    kl_free, cons_free = _finetune(0.0)
    kl_held, cons_held = _finetune(5.0)
    with torch.no_grad():
        cons_before = cons.val_loss(hf_model("llama"), cons.jacobi_trajectories(
            hf_model("llama"), torch.randint(0, 256, (16, 8), generator=torch.Generator().manual_seed(0)), 8, 2),
            16, 0.0)
    assert kl_held < 0.5 * kl_free, (kl_free, kl_held)
    assert cons_held < cons_before and cons_free < cons_before, (cons_before, cons_free, cons_held)


def test_train_records_the_kd_term(tiny_dir, tmp_path):
    info = cons.train(tiny_dir, tmp_path / "out", data=["self"], block=4, minutes=5, samples=8, val_samples=4,
                      prompt_len=8, blocks=1, batch=4, kd_weight=2.0, kd_batch=2, eval_every=1000, patience=0,
                      max_steps=3, quiet=True, threads=1)
    assert info["method"] == "cllm-global+kd" and info["kd_weight"] == 2.0 and info["kd_batch"] == 2
    assert len(info["train_loss_last20"]) == 3          # consistency, AR, KD


def test_kd_on_corpus_windows(tmp_path):
    """The corpus path (the shipped recipe's): KD windows of --kd-len tokens of text files, with code-tiny."""
    from dgopt.training.trainer import model_dir
    src = tmp_path / "text"
    src.mkdir()
    for i in range(4):
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(60)))
    info = cons.train(model_dir("code-tiny"), tmp_path / "out", data=[str(src)], block=4, minutes=5, samples=4,
                      val_samples=2, prompt_len=8, blocks=1, batch=4, lr=1e-2, kd_weight=2.0, kd_batch=2,
                      kd_len=64, eval_every=1000, patience=0, max_steps=24, quiet=True, threads=1)
    assert info["kd_len"] == 64 and info["val_ppl_on"] == "corpus validation windows"
    assert info["train_loss_last20"][2] > 0, info      # KL to the original grew once the model moved
