"""User-facing errors: each is one sentence that names the thing and what to do."""

from __future__ import annotations


class WinnowError(Exception):
    """Base of every error the CLI prints as one sentence and exits 2 on."""

    exit_code = 2


class SourceError(WinnowError):
    """A model source (path, folder, zoo name) is missing or cannot be read."""


class ModelFormatError(WinnowError):
    """A model file exists but is not a valid model (corrupt, truncated, unsafe)."""


class UnsupportedModelError(WinnowError):
    """A model uses something winnow or its runtime cannot handle."""


class PipelineError(WinnowError):
    """A pipeline text or config names an unknown pass or a bad option."""


class PassConfigError(WinnowError, ValueError):
    """A pass was built with a bad config value; the message names the field."""


class PassFailedError(WinnowError):
    """A pass raised while running; the message names it and the passes before it."""


class VerificationError(WinnowError):
    """A model failed the checker, shape inference or the structural lint."""


class ExecutionError(WinnowError):
    """ONNX Runtime could not build or run a session for a model."""


class OutputError(WinnowError):
    """An output folder cannot be written."""


class FidelityError(WinnowError):
    """A lossy result fell below the fidelity budget."""


class LosslessPassError(PassFailedError):
    """A pass that claims to be lossless changed the outputs (raised under --strict)."""
