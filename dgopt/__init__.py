"""dgopt: a compiler for LLM decoding strategies.

    art = dgopt.compile("specs/greedy.yaml", "out/greedy")
    dec = dgopt.load(art)
    dec.generate([1, 2, 3], max_new_tokens=32).ids
"""
__version__ = "0.1.0"

from .errors import DgoptError  # noqa: E402
from .pipeline import compile  # noqa: E402
from .runtime import load  # noqa: E402

__all__ = ["compile", "load", "DgoptError", "__version__"]
