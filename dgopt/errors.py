"""One exception family; the CLI turns any DgoptError into a one-line `error: ...` and exit code 2."""

__all__ = ["DgoptError", "SpecError", "ModelError", "ArtifactError", "IRError", "PassError", "BackendError"]


class DgoptError(Exception):
    """Base of every user-facing error."""


class SpecError(DgoptError):
    """A malformed or inconsistent spec; the message names the field."""


class ModelError(DgoptError):
    """The model cannot be found, loaded or exported."""


class ArtifactError(DgoptError):
    """A missing, corrupt, tampered or incompatible artifact."""


class IRError(DgoptError):
    """An IR graph that breaks an op schema or a structural rule."""


class PassError(DgoptError):
    """A pass failed; the message names the pass and the passes before it."""


class BackendError(DgoptError):
    """Lowering or running on a backend failed (e.g. an unsupported op)."""
