import os
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
torch.set_num_threads(2)

# Tiny random-init configs, one per supported family: no download, built in milliseconds.
TINY = {
    "llama": {"family": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512},
    "gpt2": {"family": "gpt2", "vocab_size": 320, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "qwen2": {"family": "qwen2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512},
}

PROMPTS = [[5, 17, 42, 99, 3], [7, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [100], [250, 3, 3, 3, 3, 3]]


def tiny_spec(family="llama", seed=0, **sections):
    spec = {"model": {"config": dict(TINY[family]), "seed": seed}, "target": {"max_seq_len": 256}}
    for k, v in sections.items():
        spec[k] = {**spec.get(k, {}), **v}
    return spec


def hf_model(family, seed=0):
    from dgopt.models.hf import config_model
    return config_model(dict(TINY[family]), seed).eval()


def noisy_draft_dir(root, name: str, scale: float, family: str = "llama") -> dict:
    """A draft that agrees with the tiny target part of the time: the target's own weights plus Gaussian noise of
    std `scale`, saved as a HF dir. Returns its spec block."""
    model = hf_model(family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(root / name)
    return {"path": str(root / name)}


def exact_two_tokens(model, prompt: list[int], sampling: dict, penalty: float = 1.0):
    """The exact distribution of the first sampled token and of the two-token joint after `prompt`, with
    transformers' own processors (repetition penalty, temperature, top-k): (p1 [V] as numpy, {(a, b): prob})."""
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper

    def dist(ids):
        with torch.no_grad():
            lg = model(torch.tensor([ids])).logits[:, -1]
        if penalty != 1.0:
            lg = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), lg)
        lg = TopKLogitsWarper(sampling["top_k"])(None, TemperatureLogitsWarper(sampling["temperature"])(None, lg))
        return torch.softmax(lg.double(), -1)[0]

    p1 = dist(prompt)
    joint = {(a, b): p1[a].item() * q
             for a in torch.nonzero(p1).flatten().tolist()
             for b, q in enumerate(dist(prompt + [a]).tolist()) if q > 0}
    return p1.numpy(), joint


def chi2_pvalue(counts: dict, probs: dict) -> float:
    """Chi-square goodness of fit of observed counts to exact probabilities; cells expected < 5 are pooled. A draw
    outside the exact support fails at once."""
    import numpy as np
    from scipy.stats import chisquare
    keys = sorted(probs, key=lambda k: -probs[k])
    obs = np.array([counts.get(k, 0) for k in keys], float)
    assert sum(counts.values()) == obs.sum(), "a draw fell outside the exact support"
    exp = np.array([probs[k] for k in keys]) * obs.sum()
    small = exp < 5
    if small.any():
        exp, obs = np.append(exp[~small], exp[small].sum()), np.append(obs[~small], obs[small].sum())
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def hf_greedy(model, prompt, max_new_tokens, repetition_penalty: float = 1.0):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, repetition_penalty=repetition_penalty)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Compiled artifacts shared by tests: (family, opt_level) -> path."""
    import dgopt
    root = tmp_path_factory.mktemp("artifacts")
    cache = {}

    def get(family="llama", opt_level=2, **sections):
        key = (family, opt_level, repr(sorted(sections.items())))
        if key not in cache:
            cache[key] = dgopt.compile(tiny_spec(family, **sections), root / f"{family}-O{opt_level}-{len(cache)}",
                                       opt_level=opt_level)
        return cache[key]
    return get


def random_past(session, B: int, P: int, rng) -> dict:
    """Random KV inputs of P slots for every cache tensor of an onnxruntime step session (a step fed by hand)."""
    shapes = {i.name: i.shape for i in session.sess.get_inputs()}
    return {t: rng.standard_normal((B, shapes[t][1], P, shapes[t][3])).astype(np.float32)
            for t in session.past["tensors"]}


def step_outputs(session, feeds: dict) -> dict:
    """One hand-fed call of a step session: its outputs by name."""
    return dict(zip([o.name for o in session.sess.get_outputs()], session.sess.run(None, feeds)))
