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
                      prompt_len=8, blocks=2, batch=16, lr=3e-3, ar_weight=0.1, eval_every=1000, patience=0,
                      max_steps=60, quiet=True, threads=1)
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
    dec = dgopt.load(dgopt.compile(path, tmp_path / "art"))
    model = AutoModelForCausalLM.from_pretrained(model_dir("code-tiny-cllm"), dtype=torch.float32).eval()
    prompts = [dec.encode(t) for t in ("def __init__(self", "import ", "    for i in range(")]
    refs = [hf_greedy(model, p, 48) for p in prompts]
    assert [dec.generate(p, max_new_tokens=48).ids[0] for p in prompts] == refs
    assert dec.generate(prompts, max_new_tokens=48).ids == refs
