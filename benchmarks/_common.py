"""Shared benchmark helpers: the machine line, the model under test, a fixed prompt set."""
from __future__ import annotations

import platform
from pathlib import Path

PY_PROMPTS = ["def __init__(self", "import ", "class ", "    def __repr__(self):\n        return ",
              "for i in range(", "if __name__ == '__main__':\n    ", "def main():\n    ", "    raise ValueError(",
              "from collections import ", "    return self.", "with open(", "try:\n    ", "def _", "    @property\n",
              "        if not isinstance(", "# Copyright", "async def ", "    except ", "print(", "lambda x: x"]

RANDOM_65M = {"family": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688,
              "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
              "max_position_embeddings": 1024}


def machine() -> str:
    from dgopt.tune import machine as cpu_and_cores
    return f"{cpu_and_cores()}, {platform.system()}"


def model_spec(name: str) -> dict:
    """'auto': the trained code-tiny when it exists, else a random-init 6.5M Llama of the same shape class."""
    if name == "auto":
        try:
            from dgopt.training.trainer import model_dir
            model_dir("code-tiny")
            name = "code-tiny"
        except Exception:  # noqa: BLE001
            name = "random"
    if name == "random":
        model = {"config": RANDOM_65M}
    elif Path(name).is_dir():
        model = {"path": str(Path(name).resolve())}
    else:
        model = {"name": name}
    return {"model": model, "target": {"max_seq_len": 1024, "max_batch": 8}}


def prompts_for(lm, n: int) -> list[list[int]]:
    if lm.tokenizer_dir:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(lm.tokenizer_dir)
        return [tok(p)["input_ids"] for p in PY_PROMPTS[:n]]
    import random
    rng = random.Random(0)
    return [[rng.randrange(lm.info["vocab_size"]) for _ in range(rng.randint(4, 16))] for _ in range(n)]


def code_prompts(lm, n: int, tokens: int = 256) -> list[list[int]]:
    """Longer code prompts for prompt lookup: the last `tokens` tokens of the first half of n source files of the
    `rich` package (a dependency, outside the stdlib corpus the project's models are trained on), sorted by name."""
    import rich
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(lm.tokenizer_dir)
    out = []
    for f in sorted(Path(rich.__file__).parent.glob("*.py")):
        ids = tok(f.read_text())["input_ids"]
        if len(ids) >= 4 * tokens:
            half = len(ids) // 2
            out.append(ids[half - tokens:half])
        if len(out) == n:
            break
    return out
