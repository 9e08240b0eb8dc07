"""edgeguard: Qwen3Guard safety models on small machines.

    >>> import edgeguard
    >>> with edgeguard.load() as guard:          # the default Gen model, pulled on first use
    ...     verdict = guard.check("How do I bake bread?")
    >>> verdict.label, verdict.flagged
"""

from importlib.metadata import PackageNotFoundError, version as _version

from edgeguard import native_order as _native_order
from edgeguard.errors import EdgeguardError, InputTooLong, ModelError, UsageError
from edgeguard.verdict import StreamState, TokenVerdict, Verdict

__all__ = [
    "EdgeguardError",
    "InputTooLong",
    "ModelError",
    "StreamState",
    "TokenVerdict",
    "UsageError",
    "Verdict",
    "__version__",
    "guard_stream",
    "load",
]
if _native_order.llama_is_cuda_build():  # onnxruntime must load before a CUDA llama.cpp
    _native_order.load_onnxruntime_first()

try:
    __version__ = _version("edgeguard")  # one source: pyproject.toml, through the package metadata
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"


def load(model=None, quant=None, **kwargs):
    """A ``GenGuard`` or ``StreamGuard`` for a registry name, converted folder or checkpoint
    folder (see ``edgeguard.loader.load``). Imported lazily to keep ``import edgeguard`` light."""
    from edgeguard.loader import load as _load

    return _load(model, quant, **kwargs)


def guard_stream(session, chunks):
    """Pass a text stream through a Stream session, stopping when it is flagged
    (see ``edgeguard.stream_cli.guard_stream``)."""
    from edgeguard.stream_cli import guard_stream as _guard_stream

    return _guard_stream(session, chunks)
