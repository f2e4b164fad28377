"""dgopt: a compiler for LLM decoding strategies.

    art = dgopt.compile("specs/greedy.yaml", "out/greedy")
    dec = dgopt.load(art)
    dec.generate([1, 2, 3], max_new_tokens=32).ids
"""
from .errors import DgoptError
from .version import __version__

__all__ = ["compile", "load", "DgoptError", "__version__"]


def __getattr__(name: str):
    # compile and load are looked up on first use (PEP 562): Python runs this file before any submodule, and
    # `import dgopt.backends.onnx` must not pull in the compiler driver and the runtime above it
    if name == "compile":
        from .pipeline import compile
        return compile
    if name == "load":
        from .runtime import load
        return load
    raise AttributeError(f"module 'dgopt' has no attribute {name!r}")
