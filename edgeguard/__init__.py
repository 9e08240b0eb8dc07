"""edgeguard: Qwen3Guard safety models on small machines."""

from edgeguard.errors import EdgeguardError, ModelError, UsageError

__all__ = ["EdgeguardError", "ModelError", "UsageError", "__version__"]
__version__ = "0.1.0"
