"""Strategy expansion: spec.strategy -> IR step graph. One module per strategy."""
from ..errors import SpecError
from ..ir import Graph
from ..spec import Spec
from .autoregressive import expand_autoregressive
from .lookahead import expand_jacobi, expand_lookahead, expand_speculative
from .ngram import expand_ngram

EXPANDERS = {"autoregressive": expand_autoregressive, "lookahead": expand_lookahead, "jacobi": expand_jacobi,
             "speculative": expand_speculative, "uag": expand_speculative,
             "ngram": expand_ngram}

__all__ = ["expand", "EXPANDERS"]


def expand(spec: Spec) -> Graph:
    try:
        return EXPANDERS[spec.strategy.kind](spec)
    except KeyError:
        raise SpecError(f"spec field 'strategy.kind': no expansion for '{spec.strategy.kind}'") from None
