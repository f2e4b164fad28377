"""The recyclable module (RecycleGPT, arXiv 2308.03421) in EAGLE's feature-recursive form (arXiv 2401.15077).

One step maps (h_t, token t+1) to h_{t+1} and logits for token t+2:

    x     = fc([rms(h_t); rms(E[tok_{t+1}])])        E: the target's frozen embedding table
    x     = x + down(silu(gate(rms(x))) * up(rms(x)))  one SwiGLU block (no attention: the target's
                                                      hidden state already carries the context)
    h_t+1 = final_norm(x)                             the target's frozen final norm
    logits = lm_head(h_t+1)                           the target's frozen LM head

h is the target's hidden state *after* its final norm (the LM head's input). Why that one: that space is
well scaled (per-dimension RMS ~ the norm weight, whatever the depth), so the feature-regression loss needs no
per-model scaling; the step's output feeds the next step unchanged (h_t -> h_t+1 -> h_t+2 ... with the proposed
tokens' embeddings); and the step graph already computes it (the LM head's input), so exposing it costs nothing.

Saved as ``recycle.safetensors`` + ``recycle.json`` (sizes, the target's reference and hash, training info);
the frozen target weights are not copied: they are read from the target at compile time.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import ModelError

WEIGHTS, CONFIG = "recycle.safetensors", "recycle.json"
SUPPORTED_FAMILIES = ("llama", "qwen2")


def target_hash(model) -> str:
    """A short content hash of the target's weights (name, shape, bytes of every tensor), so a module trained for
    one model is refused for another even when both are called the same."""
    import torch
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def final_norm(model):
    """The target's final norm module (RMSNorm in llama/qwen2)."""
    family = model.config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ModelError(f"recycle: model family {family!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_FAMILIES)})")
    return model.model.norm


def _module_class():
    import torch
    from torch import nn

    class RMS(nn.Module):
        def __init__(self, n: int, eps: float):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class RecycleModule(nn.Module):
        """The trainable part; `step` needs the target's frozen embedding, final norm and LM head passed in."""

        def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-5):
            super().__init__()
            self.hidden_size, self.intermediate_size, self.eps = hidden_size, intermediate_size, eps
            self.norm_h, self.norm_e = RMS(hidden_size, eps), RMS(hidden_size, eps)
            self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
            self.norm_x = RMS(hidden_size, eps)
            self.gate = nn.Linear(hidden_size, intermediate_size, bias=False)
            self.up = nn.Linear(hidden_size, intermediate_size, bias=False)
            self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

        def forward(self, h, emb):
            """(…, H) post-norm hidden at t, (…, H) embedding of token t+1 -> (…, H) pre-norm hidden at t+1."""
            x = self.fc(torch.cat([self.norm_h(h), self.norm_e(emb)], dim=-1))
            y = self.norm_x(x)
            return x + self.down(nn.functional.silu(self.gate(y)) * self.up(y))

        def config(self) -> dict:
            return {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size, "eps": self.eps}

    return RecycleModule


def new_module(hidden_size: int, intermediate_size: int, eps: float = 1e-5, seed: int = 0):
    import torch
    torch.manual_seed(seed)
    m = _module_class()(hidden_size, intermediate_size, eps)
    for lin in (m.fc, m.gate, m.up, m.down):
        torch.nn.init.normal_(lin.weight, std=0.02)
    return m


class Frozen:
    """The target's frozen pieces the module uses: embedding table, final norm, LM head."""

    def __init__(self, model):
        self.embed = model.get_input_embeddings()
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()

    def step(self, module, h, tok):
        """One chain step: (post-norm h_t, token t+1) -> (post-norm h_{t+1}, logits for token t+2)."""
        hn = self.norm(module(h, self.embed(tok)))
        return hn, self.head(hn)


def save(module, out: Path, target_ref: str, target_sha: str, info: dict | None = None) -> None:
    """Write the module next to the target's reference and hash; files appear only when both are written."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"kind": "recycle", **module.config(), "target": target_ref, "target_sha": target_sha,
           "params": int(sum(p.numel() for p in module.parameters())), **(info or {})}
    tmp_w, tmp_c = out / (WEIGHTS + ".tmp"), out / (CONFIG + ".tmp")
    save_file({k: v.detach().contiguous().float() for k, v in module.state_dict().items()}, str(tmp_w))
    tmp_c.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp_w.replace(out / WEIGHTS)
    tmp_c.replace(out / CONFIG)


def read_config(path: Path, field: str = "recycle.path") -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{field}: recycle module directory not found: {path}")
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ModelError(f"{field}: {path} is not a recycle module (needs {CONFIG} and {WEIGHTS}; "
                         f"build one with: dgopt train recycle MODEL_DIR -o {path})")
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{field}: {path / CONFIG} is not valid JSON: {e}") from None
    for key in ("hidden_size", "intermediate_size", "target_sha"):
        if key not in cfg:
            raise ModelError(f"{field}: {path / CONFIG} lacks {key!r}")
    return cfg


def load(path: Path, field: str = "recycle.path"):
    """(module in eval mode, config dict)."""
    from safetensors.torch import load_file
    cfg = read_config(path, field)
    m = _module_class()(int(cfg["hidden_size"]), int(cfg["intermediate_size"]), float(cfg.get("eps", 1e-5)))
    try:
        m.load_state_dict(load_file(str(Path(path) / WEIGHTS)))
    except Exception as e:  # noqa: BLE001 - a damaged or mismatched weights file is the user's input
        raise ModelError(f"{field}: cannot load {Path(path) / WEIGHTS}: {str(e).splitlines()[0]}") from None
    return m.eval(), cfg


def check_target(cfg: dict, model, target_ref: str, path: Path, field: str = "recycle") -> None:
    """One-line error naming both models when the module was trained for another target."""
    sha = target_hash(model)
    hidden = int(getattr(model.config, "hidden_size", 0))
    if cfg["target_sha"] != sha or int(cfg["hidden_size"]) != hidden:
        raise ModelError(f"{field}: module {path} was trained for {cfg.get('target', '?')} (sha {cfg['target_sha']}), "
                         f"not for this spec's model {target_ref} (sha {sha})")


def step_weights(module, model, vocab: list[int] | None = None) -> dict:
    """What the step graph's recycle_step nodes need, as float32 numpy arrays laid out for x @ W: the module's own
    weights (fc split: its hidden half fc_h, and its token half folded into a table emb_fc [V, H] = fc_e(rms(E))),
    the target's frozen final norm and LM head (only the draft vocabulary's columns, and `vocab` their ids, for a
    module that has one); plus both norms' eps."""
    import numpy as np
    import torch
    f = lambda t: t.detach().float().cpu().numpy().astype(np.float32)  # noqa: E731
    norm = final_norm(model)
    H = module.hidden_size
    fc = module.fc.weight.detach().float().cpu()                          # [H, 2H] over [rms(h); rms(E[tok])]
    with torch.no_grad():   # the token's half of fc depends on the token only: one table row per token
        emb_fc = module.norm_e(model.get_input_embeddings().weight.detach().float().cpu()) @ fc[:, H:].T
    head = f(model.get_output_embeddings().weight).T                        # [H, V]
    w = {"norm_h": f(module.norm_h.weight), "fc_h": f(fc[:, :H]).T, "emb_fc": f(emb_fc),
         "norm_x": f(module.norm_x.weight), "gate": f(module.gate.weight).T, "up": f(module.up.weight).T,
         "down": f(module.down.weight).T, "final_norm": f(norm.weight)}
    if vocab is not None:   # the draft vocabulary: the head's columns of those tokens, and their ids
        # ascending and distinct (a set: the order changes nothing), so that the fused greedy chain's argmax over
        # these columns picks, even among ties, the token argmax over the whole vocabulary row would
        vocab = sorted(set(vocab))
        w["lm_head"], w["vocab"] = head[:, vocab], np.asarray(vocab, np.int64)
    else:
        w["lm_head"] = head
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return {"weights": {k: np.ascontiguousarray(v) for k, v in w.items()}, "eps": float(module.eps),
            "target_eps": float(eps)}


def module_dir(rspec, resolve) -> tuple[Path, str]:
    """(directory, field) of the spec's `recycle:` entry: a path (spec-relative), or a name among the committed
    assets and the user's model cache."""
    if rspec.path is not None:
        return Path(resolve(rspec.path)), "recycle.path"
    from ..training.trainer import asset_dir, cache_dir
    for d in (asset_dir(rspec.name), cache_dir(rspec.name)):
        if (d / CONFIG).is_file():
            return d, "recycle.name"
    raise ModelError(f"recycle.name: recyclable module {rspec.name!r} is not built (looked in {asset_dir(rspec.name)} "
                     f"and {cache_dir(rspec.name)}); build it with: dgopt models build {rspec.name}")


def for_spec(spec, lm) -> tuple[dict, dict]:
    """(the module's config for the manifest, the lowering's weights) for the spec's target `lm`, refusing a
    module trained for another model."""
    path, field = module_dir(spec.recycle, spec.resolve)
    module, cfg = load(path, field)
    check_target(cfg, lm.model, lm.source, path, field)
    vocab = cfg.get("draft_vocab")
    if vocab is not None:
        V = int(lm.model.get_output_embeddings().weight.shape[0])
        if not isinstance(vocab, list) or not vocab or any(not isinstance(t, int) or not 0 <= t < V for t in vocab):
            raise ModelError(f"{field}: {path / CONFIG}: draft_vocab must be a non-empty list of token ids below {V}")
    info = {k: v for k, v in cfg.items() if k not in ("training", "draft_vocab")}
    if vocab is not None:
        info["draft_vocab_size"] = len(vocab)
    return info | {"path": str(path)}, step_weights(module, lm.model, vocab)
