"""spec.yaml schema: what to decode (model, strategy, sampling) and for what target.

Paths inside a spec are relative to the spec file. Every validation failure becomes one SpecError line that names
the field, e.g. ``spec field 'sampling.top_p': Input should be less than or equal to 1``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .errors import SpecError

__all__ = ["Spec", "ModelSpec", "SamplingSpec", "TargetSpec", "StrategySpec", "load_spec", "spec_from_dict",
           "apply_overrides", "FAMILIES", "STRATEGY_KINDS", "DEFAULT_MAX_SEQ_LEN", "DTYPE_ALIASES", "RecycleSpec"]

FAMILIES = ("llama", "gpt2", "qwen2")
STRATEGY_KINDS = ("autoregressive", "lookahead", "jacobi", "speculative", "uag", "recycle", "ngram")
IMPLEMENTED_STRATEGIES = ("autoregressive", "lookahead", "jacobi", "speculative", "uag", "ngram", "recycle")
MULTI_TOKEN = ("lookahead", "jacobi", "speculative", "uag", "ngram", "recycle")
DEFAULT_MAX_SEQ_LEN = 1024     # target.max_seq_len left out: this, or less where a model has fewer positions


# transformers' dtype names (as users write torch_dtype) -> the one spelling dgopt records
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
Precision = Annotated[Literal["fp32", "fp16", "bf16"],
                      BeforeValidator(lambda v: DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfigSpec(BaseModel):
    """A randomly initialised model from a transformers config; sizes pass straight to the config class."""
    model_config = ConfigDict(extra="allow")
    family: Literal["llama", "gpt2", "qwen2"]


class ModelSpec(_Strict):
    path: str | None = None          # a local Hugging Face model dir
    name: str | None = None          # a model built by `dgopt models build NAME` (e.g. code-tiny)
    config: ModelConfigSpec | None = None
    seed: int = 0                    # init seed for `config` models
    dtype: Precision = "fp32"

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("path", "name", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, name, config (got {given or 'none'})")
        return self


class StrategySpec(_Strict):
    kind: Literal["autoregressive", "lookahead", "jacobi", "speculative", "uag", "recycle", "ngram"] = "autoregressive"
    # lookahead: W window columns, N n-gram size (N-1 window levels), G candidate n-grams verified per step
    window: int = Field(5, ge=1)
    ngram: int = Field(4, ge=1)
    guesses: int = Field(5, ge=0)
    # jacobi: n guessed tokens refined per step (the converged prefix is committed every step); the next guess is
    # "chain": the rest of the model's own output chain (CLLM's Jacobi), or "ngram": the continuation of the longest
    # context suffix (min_ngram..max_ngram tokens) seen before, the rest of the chain behind it (Jacobi Forcing's
    # rejection recycling; the guess never changes the output, only how much of it a step commits)
    block: int = Field(8, ge=1)
    guess: Literal["chain", "ngram"] = "ngram"
    # speculative: k tokens proposed by the draft model per step, verified by the target in one forward;
    # uag: the draft (another tokenizer) generates k of its tokens, re-tokenized into at most k target candidates
    k: int = Field(4, ge=1)
    # speculative, uag, recycle (greedy): constant k, or transformers' heuristic (k + 2 after a step that accepted
    # every proposal, else k - 1, within 1..k_max; k is the first step's): the draft's chain is a loop run k times
    k_schedule: Literal["constant", "heuristic"] = "constant"
    k_max: int = Field(8, ge=1)
    # speculative, uag (greedy): the draft ends a step's chain after a proposal it gives less than this probability
    # (transformers' assistant_confidence_threshold; 0: off): k is then the most it proposes
    confidence: float = Field(0.0, ge=0, lt=1)
    # speculative (greedy and sampling): draft chain and target verification in one step graph (one call per step);
    # false keeps the draft in its own draft.onnx, called before the target
    fused: bool = True
    # recycle: true (lossless) verifies the module's k proposals with the target each step; false is RecycleGPT's
    # own mode, LOSSY: tokens from the module are committed unverified
    verify: bool = True
    # any multi-token kind: a call with more rows than this runs the target's plain autoregressive step instead
    # (compiled into the artifact beside the strategy's step; vLLM's speculative_disable_by_batch_size): on a CPU,
    # past a batch of one or two, the wider verify forward costs more than the extra tokens commit. 0: never
    draft_max_batch: int = Field(0, ge=0)
    # ngram (prompt lookup): k tokens of up to `guesses` continuations of the longest context suffix (max_ngram down
    # to min_ngram tokens) that occurred before; `document`: a text file whose tokens are searched as well
    min_ngram: int = Field(1, ge=1)
    max_ngram: int = Field(3, ge=1)
    document: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _ngram_defaults(cls, data):
        # one guess by default: its length can then vary per step (no match: a step as cheap as autoregressive)
        if isinstance(data, dict) and data.get("kind") == "ngram" and "guesses" not in data:
            data = {**data, "guesses": 1}
        return data

    @model_validator(mode="after")
    def _degenerate(self):
        if self.kind == "lookahead" and self.ngram == 1 and self.guesses:
            raise ValueError("ngram 1 has no n-grams to verify: set guesses to 0 (autoregressive)")
        if not self.fused and self.kind != "speculative":     # (true is the default, written by every dump)
            raise ValueError(f"fused: false applies to strategy speculative only, not '{self.kind}'")
        if self.k_schedule == "heuristic":
            if self.kind not in ("speculative", "uag", "ngram", "recycle"):
                raise ValueError(f"k_schedule heuristic needs strategy speculative, uag, recycle or ngram (got "
                                 f"{self.kind})")
            if self.kind == "recycle" and not self.verify:
                raise ValueError("k_schedule heuristic with recycle needs verify: true (the lossy mode commits k "
                                 "unverified tokens: a constant k)")
            if self.kind == "ngram" and self.guesses != 1:
                raise ValueError("k_schedule heuristic with ngram needs guesses 1 (one proposal of varying length)")
            if self.k > self.k_max:
                raise ValueError(f"k {self.k} exceeds k_max {self.k_max}")
        if self.confidence and self.kind not in ("speculative", "uag"):
            raise ValueError(f"confidence needs strategy speculative or uag (got {self.kind})")
        if self.kind == "ngram" and self.guesses < 1:
            raise ValueError("ngram needs guesses >= 1 (continuations verified per step)")
        uses_index = self.kind == "ngram" or (self.kind == "jacobi" and self.guess == "ngram")
        if uses_index and self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram {self.min_ngram} exceeds max_ngram {self.max_ngram}")
        if self.draft_max_batch and self.kind == "autoregressive":
            raise ValueError("draft_max_batch applies to multi-token strategies, not 'autoregressive' (nothing to "
                             "fall back from)")
        if self.kind != "ngram" and self.document is not None:
            raise ValueError(f"document applies to strategy ngram only, not '{self.kind}'")
        return self

    @property
    def draft_loop(self) -> bool:
        """The draft's chain is a loop (its length varies per step: a heuristic k, or an early stop)."""
        return self.kind in ("speculative", "uag") and (self.k_schedule == "heuristic" or self.confidence > 0)


class SamplingSpec(_Strict):
    kind: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)                 # 0: off
    top_p: float = Field(1.0, gt=0, le=1)       # 1: off
    min_p: float = Field(0.0, ge=0, lt=1)       # 0: off
    repetition_penalty: float = Field(1.0, gt=0)  # 1: off
    noise: Literal["precomputed", "in_graph"] = "precomputed"
    seed: int = 0


class TargetSpec(_Strict):
    backend: Literal["onnx", "tensorrt"] = "onnx"
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Precision = "fp32"
    max_batch: int = Field(8, ge=1)
    # None (left out): the pipeline uses min(1024, the model's max_position_embeddings, a speculative draft's)
    max_seq_len: int | None = Field(None, ge=2)
    # how the model's forward becomes ONNX: direct (Llama / Qwen2 fp32, written from the weights, half the kernels),
    # contrib (direct with onnxruntime's contrib ops: half again; onnx backend only), traced
    # (torch.onnx.export of the transformers forward), auto (contrib for the onnx backend on the cpu, else direct,
    # where they apply; else traced)
    forward: Literal["auto", "contrib", "direct", "traced"] = "auto"


class RecycleSpec(_Strict):
    """The recyclable module for strategy recycle: a directory written by `dgopt train recycle`, or a built name."""
    path: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("path", "name") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, name (got {given or 'none'})")
        return self


class Spec(_Strict):
    model: ModelSpec
    draft: ModelSpec | None = None
    recycle: RecycleSpec | None = None
    strategy: StrategySpec = StrategySpec()
    sampling: SamplingSpec = SamplingSpec()
    target: TargetSpec = TargetSpec()
    graph: dict[str, Any] | None = None   # explicit IR (what `--dump-passes` writes); replaces strategy expansion
    tuned: dict[str, Any] | None = None   # written by `dgopt tune`: what was measured where; recorded in the manifest

    _base_dir: Path = Path(".")

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _fmt_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"spec field '{loc}': {msg}" if loc else f"spec: {msg}")
    more = f" (+{len(e.errors()) - 3} more)" if len(e.errors()) > 3 else ""
    return "; ".join(parts) + more


def spec_from_dict(data: Any, base_dir: Path | str = ".") -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"spec: top level must be a mapping, got {type(data).__name__}")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_fmt_error(e)) from None
    if spec.strategy.kind not in IMPLEMENTED_STRATEGIES:
        raise SpecError(f"spec field 'strategy.kind': '{spec.strategy.kind}' is not implemented yet "
                        f"(implemented: {', '.join(IMPLEMENTED_STRATEGIES)})")
    if spec.strategy.kind in ("ngram", "recycle") and spec.strategy.k_schedule == "heuristic" and \
            spec.sampling.kind == "sample":
        raise SpecError(f"spec field 'strategy.k_schedule': heuristic {spec.strategy.kind} proposals vary in length, "
                        "greedy only (a sampled step verifies a fixed width of k): use k_schedule constant")
    if spec.strategy.draft_loop and spec.sampling.kind == "sample":
        field = "k_schedule" if spec.strategy.k_schedule == "heuristic" else "confidence"
        why = ("speculative sampling needs the draft's distribution at each proposal" if spec.strategy.kind ==
               "speculative" else "uag sampling matches draws against a fixed width of k candidates")
        raise SpecError(f"spec field 'strategy.{field}': {'heuristic' if field == 'k_schedule' else 'an early stop'} "
                        f"runs the draft chain as a loop of varying length, greedy only; {why}: use k_schedule "
                        "constant and confidence 0")
    if spec.strategy.kind in MULTI_TOKEN and spec.sampling.kind == "sample" and spec.sampling.noise != "precomputed":
        raise SpecError(f"spec field 'sampling.noise': {spec.strategy.kind} sampling draws its noise on the host; "
                        "use precomputed")
    if spec.strategy.kind in ("speculative", "uag") and spec.draft is None:
        raise SpecError(f"spec field 'draft': strategy '{spec.strategy.kind}' needs a draft model (path, name or "
                        "config)")
    if spec.strategy.kind == "recycle" and spec.recycle is None:
        raise SpecError("spec field 'recycle': strategy 'recycle' needs a recyclable module (recycle: {path: DIR} or "
                        "{name: NAME}; train one with: dgopt train recycle MODEL_DIR -o DIR)")
    if spec.recycle is not None and spec.strategy.kind != "recycle":
        raise SpecError(f"spec field 'recycle': a recyclable module is used by strategy recycle only, not "
                        f"'{spec.strategy.kind}'")
    if not spec.strategy.verify and spec.strategy.kind == "recycle" and spec.sampling.kind != "greedy":
        raise SpecError("spec field 'strategy.verify': false (RecycleGPT's unverified, lossy mode) supports "
                        f"sampling.kind greedy only, not '{spec.sampling.kind}'; use verify: true (lossless)")
    if not spec.strategy.verify and spec.strategy.kind != "recycle":
        raise SpecError(f"spec field 'strategy.verify': false applies to strategy recycle only, not "
                        f"'{spec.strategy.kind}'")
    if spec.strategy.draft_max_batch and spec.target.backend != "onnx":
        raise SpecError("spec field 'strategy.draft_max_batch': the autoregressive fallback step is built for "
                        f"backend onnx only, not '{spec.target.backend}' (set it to 0)")
    if spec.target.backend == "tensorrt" and spec.target.device != "cuda":
        raise SpecError("spec field 'target.device': the tensorrt backend needs device 'cuda'")
    spec._base_dir = Path(base_dir).resolve()
    if spec.strategy.document is not None and not spec.resolve(spec.strategy.document).is_file():
        raise SpecError(f"spec field 'strategy.document': file not found: {spec.strategy.document}")
    return spec


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set a.b=VALUE`: VALUE is parsed as YAML, so numbers and booleans keep their types."""
    for item in overrides or []:
        if "=" not in item:
            raise SpecError(f"--set '{item}': expected KEY.PATH=VALUE")
        key, raw = item.split("=", 1)
        keys = [k for k in key.strip().split(".") if k]
        if not keys:
            raise SpecError(f"--set '{item}': empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise SpecError(f"--set '{item}': '{k}' is not a mapping")
            node = node[k]
        node[keys[-1]] = value
    return data


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"spec {path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise SpecError(f"spec {path}: file is empty")
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return spec_from_dict(data, base_dir=path.parent)
