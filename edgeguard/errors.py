"""The one exception hierarchy of edgeguard; the CLI maps it to exit codes."""


class EdgeguardError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 3


class UsageError(EdgeguardError):
    """Bad input from the user: empty text, a malformed file, an unknown option value."""

    exit_code = 2


class ModelError(EdgeguardError):
    """A model that cannot be found, read, converted or verified."""

    exit_code = 3


class ConversionError(ModelError):
    """A checkpoint that cannot be converted (missing, truncated, contradicting its config)."""


class IntegrityError(ModelError):
    """An artifact whose size or sha256 differs from its manifest."""


class RuntimeFailure(EdgeguardError):
    """llama.cpp or onnxruntime failed while running a model."""

    exit_code = 3


class InputTooLong(UsageError):
    """The rendered conversation does not fit the model's context window."""
