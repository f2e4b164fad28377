"""Strategy expansion: spec.strategy -> IR step graph. One module per strategy kind, one registry line each;
shared pieces: verify.py (the verify branch), draft_chain.py (a draft's chained proposals)."""
from ..errors import SpecError
from ..ir import Graph
from ..spec import Spec
from .autoregressive import expand_autoregressive
from .jacobi import expand_jacobi
from .lookahead import expand_lookahead
from .recycle import expand_recycle
from .ngram import expand_ngram
from .speculative import expand_speculative
from .uag import expand_uag

EXPANDERS = {
    "autoregressive": expand_autoregressive,
    "lookahead": expand_lookahead,
    "jacobi": expand_jacobi,
    "speculative": expand_speculative,
    "uag": expand_uag,
    "recycle": expand_recycle,
    "ngram": expand_ngram,
}

__all__ = ["expand", "EXPANDERS"]


def expand(spec: Spec) -> Graph:
    try:
        return EXPANDERS[spec.strategy.kind](spec)
    except KeyError:
        raise SpecError(f"spec field 'strategy.kind': no expansion for '{spec.strategy.kind}'") from None
