"""Runtime: loads an artifact (never imports passes or backends' lowering) and runs the decode loop."""
from .decoder import Decoder, GenerateResult, load

__all__ = ["Decoder", "GenerateResult", "load"]
