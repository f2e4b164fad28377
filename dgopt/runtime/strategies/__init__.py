"""The runtime's part of each strategy, one module per kind (interface: base.py). Adding a strategy: one module
here and one line below."""
from .autoregressive import Autoregressive
from .jacobi import Jacobi
from .lookahead import Lookahead
from .recycle import Recycle
from .ngram import Ngram
from .speculative import Speculative
from .uag import UAG

STRATEGIES = {
    "autoregressive": Autoregressive,
    "lookahead": Lookahead,
    "jacobi": Jacobi,
    "speculative": Speculative,
    "uag": UAG,
    "recycle": Recycle,
    "ngram": Ngram,
}

__all__ = ["STRATEGIES"]
