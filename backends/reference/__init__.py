"""Reference backend: a torch eager interpreter of the IR, used as the oracle in tests."""
from .interp import exact_probs, run_graph

__all__ = ["run_graph", "exact_probs"]
