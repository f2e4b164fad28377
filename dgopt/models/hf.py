"""Hugging Face import: load a causal LM (local dir, built name, or random-init config) and export its decode step
to ONNX with the KV cache as flat inputs/outputs, explicit position_ids and an explicit additive 4D mask."""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError

__all__ = ["LoadedModel", "load_model", "export_forward", "config_model", "FAMILY_CLASSES"]

FAMILY_CLASSES = {  # family -> (config class, model class) names in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


@dataclass
class LoadedModel:
    model: object                     # transformers PreTrainedModel, eval mode, eager attention
    family: str
    source: str                       # human-readable origin
    tokenizer_dir: Path | None = None
    info: dict = field(default_factory=dict)


def _info(model, family: str) -> dict:
    c = model.config
    n_heads = getattr(c, "num_attention_heads", None) or c.n_head
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    head_dim = getattr(c, "head_dim", None) or hidden // n_heads
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = c.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    if pad is None:
        pad = c.pad_token_id if getattr(c, "pad_token_id", None) is not None else (eos[0] if eos else 0)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if not 0 <= pad < vocab:   # pad only fills masked slots; it must merely be a valid id (gpt2 configs say 50256)
        pad = 0
    return {
        "family": family,
        "vocab_size": vocab,
        "num_layers": int(getattr(c, "num_hidden_layers", None) or c.n_layer),
        "num_kv_heads": int(getattr(c, "num_key_value_heads", None) or n_heads),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 0)),
        "eos_token_ids": [int(e) for e in eos],
        "bos_token_id": None if getattr(c, "bos_token_id", None) is None else int(c.bos_token_id),
        "pad_token_id": int(pad),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }


def _finish(model, family: str, source: str, tok_dir: Path | None) -> LoadedModel:
    model.config._attn_implementation = "eager"   # plain ops: exports cleanly and runs the additive mask as given
    model.eval()
    return LoadedModel(model, family, source, tok_dir, _info(model, family))


def config_model(config: dict, seed: int = 0):
    """A randomly initialised model from a family name and config sizes (tests, demos without weights)."""
    import torch
    import transformers
    cfg = dict(config)
    family = cfg.pop("family")
    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    try:
        hf_cfg = cfg_cls(**cfg)
    except Exception as e:  # noqa: BLE001 - config classes raise several validation error types
        raise ModelError(f"model.config: invalid {family} config: {str(e).splitlines()[-1].strip()}") from None
    torch.manual_seed(seed)
    return model_cls(hf_cfg)


def load_model(mspec, resolve=lambda p: Path(p)) -> LoadedModel:
    """`mspec` is a spec.ModelSpec; `resolve` turns spec-relative paths into real ones."""
    import torch
    if mspec.config is not None:
        cfg = mspec.config.model_dump()
        return _finish(config_model(cfg, mspec.seed), cfg["family"], f"random-init {cfg['family']} (seed {mspec.seed})",
                       None)
    if mspec.name is not None:
        from ..training.trainer import model_dir
        try:
            path = model_dir(mspec.name)
        except (FileNotFoundError, KeyError) as e:
            raise ModelError(f"model.name: {e.args[0] if e.args else e}") from None
        field_name = "model.name"
    else:
        path, field_name = resolve(mspec.path), "model.path"
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{field_name}: model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{field_name}: {path} has no config.json (not a Hugging Face model dir)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ModelError(f"{field_name}: {cfg_file} is not valid JSON: {e}") from None
    if model_type not in FAMILY_CLASSES:
        raise ModelError(f"{field_name}: unsupported model family '{model_type}' "
                         f"(supported: {', '.join(FAMILY_CLASSES)})")
    from transformers import AutoModelForCausalLM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except Exception as e:  # noqa: BLE001 - any load failure is the user's model dir
        raise ModelError(f"{field_name}: cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    tok = path if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None
    return _finish(model, model_type, str(path), tok)


def window_mask(mask, window: int):
    """The additive mask of a sliding-window layer (torch; direct.py writes the same in ONNX): a query's visible
    keys are its sequence, one per position, in slot order, so the key with n visible keys after it lies n
    positions back; transformers masks it when n >= window."""
    import torch
    seen = (mask > -1).to(torch.int32)
    after = seen.flip(-1).cumsum(-1).flip(-1) - seen
    return torch.where(after >= window, torch.finfo(mask.dtype).min, mask)


def _step_module(model, num_layers: int):
    import torch
    from transformers import DynamicCache

    from .direct import sliding_window
    window = sliding_window(model.config) if hasattr(model.config, "sliding_window") else None

    class Step(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, position_ids, attn_mask, *past):
            # no config: every layer keeps its whole cache (a sliding layer's would drop keys, and the mask's
            # width would no longer match); the window is in the mask instead
            cache = DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            if window is not None:      # a prepared mask per layer type, as transformers' generate passes
                attn_mask = {"full_attention": attn_mask, "sliding_attention": window_mask(attn_mask, window)}
            out = self.m(input_ids=input_ids, position_ids=position_ids, attention_mask=attn_mask,
                         past_key_values=cache, use_cache=True)
            res = [out.logits]
            for layer in out.past_key_values.layers[:num_layers]:
                res += [layer.keys, layer.values]
            return tuple(res)

    return Step(model).eval()


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def export_forward(lm: LoadedModel, dtype: str = "float32", method: str = "auto", contrib_ok: bool = False):
    """ONNX ModelProto of one forward: (input_ids, position_ids, attn_mask, past.*) -> (logits, present.*).
    method "direct" writes a Llama / Qwen2 fp32 forward straight from the weights (`direct.py`: half the kernels);
    "contrib" the same with onnxruntime's contrib ops (half again; onnxruntime only); "traced" runs torch.onnx.export;
    "auto" takes contrib where it applies and `contrib_ok` (onnxruntime on the CPU; multi-head and grouped-query
    attention: faster than direct on both, benchmarks/forward_gqa.py), else direct where it applies.
    `lm.info["forward"]` records which.
    Traced at batch 2, q 3, past 4 with every such axis dynamic: the legacy tracer bakes size-1 dims and transformers'
    `q_length == 1` branches into the graph otherwise (seen: a q=1 trace failed at prefill).
    dtype float16: a copy with half parameters is traced, so weights, mask, KV and logits are fp16 and the upcasts
    transformers does itself (RMSNorm in fp32) are in the graph as in its fp16 inference. Buffers stay fp32 as
    from_pretrained(dtype=float16) keeps them: a half rotary inv_freq would shift every position's angle (logits
    0.07 off transformers' fp16 model at position ~1000 instead of 0)."""
    import copy

    import onnx
    import torch

    from .direct import direct_forward, unsupported_reason
    for written in ("contrib", "direct"):
        why = unsupported_reason(lm, dtype, contrib=written == "contrib")
        if method == written and why:
            raise ModelError(f"target.forward: {written} cannot write this model: {why}; use auto or traced")
        if not why and (method == written or method == "auto" and (written == "direct" or contrib_ok)):
            lm.info["forward"] = written
            return direct_forward(lm, contrib=written == "contrib")
    lm.info["forward"] = "traced"
    info = lm.info
    half = dtype == "float16"
    model = lm.model
    if half:
        model = copy.deepcopy(lm.model)
        for p in model.parameters():
            p.data = p.data.half()
    fdt = torch.float16 if half else torch.float32
    L, H, D = info["num_layers"], info["num_kv_heads"], info["head_dim"]
    B, q, P = 2, 3, 4
    step = _step_module(model, L)
    ids = torch.randint(0, info["vocab_size"], (B, q))
    pos = torch.arange(P, P + q).expand(B, q).contiguous()
    mask = torch.zeros(B, 1, q, P + q, dtype=fdt)
    past = [torch.zeros(B, H, P, D, dtype=fdt) for _ in range(2 * L)]
    in_names = ["input_ids", "position_ids", "attn_mask"] + kv_names(L, "past")
    out_names = ["logits"] + kv_names(L, "present")
    dyn = {"input_ids": {0: "batch", 1: "q"}, "position_ids": {0: "batch", 1: "q"},
           "attn_mask": {0: "batch", 2: "q", 3: "total"}, "logits": {0: "batch", 1: "q"}}
    dyn |= {n: {0: "batch", 2: "past"} for n in in_names[3:]}
    dyn |= {n: {0: "batch", 2: "total"} for n in out_names[1:]}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(step, (ids, pos, mask, *past), buf, input_names=in_names, output_names=out_names,
                              dynamic_axes=dyn, opset_version=18, dynamo=False, do_constant_folding=True)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"ONNX export of the {lm.family} forward failed: {type(e).__name__}: {e}") from None
    lm.model.eval()   # the exporter restores the wrapper's train() flag recursively; keep the model in eval
    return onnx.load_from_string(buf.getvalue())
