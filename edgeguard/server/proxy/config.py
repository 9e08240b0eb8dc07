"""The proxy's options, validated where they enter (``edgeguard serve`` or ``create_app``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from edgeguard.errors import UsageError

ON_FLAG = ("cut", "care")
DEFAULT_REFUSAL = "I can't continue with that."
# The system message a CARE continuation carries: the LLM resumes its own answer, safely.
STEERING = ("Your previous answer was stopped because it was becoming unsafe. Continue the assistant "
            "message from exactly where it ends, without repeating it, and keep the rest of the answer "
            "safe and helpful; if the request cannot be answered safely, politely decline.")


@dataclass(frozen=True)
class ProxyConfig:
    upstream: str  # the upstream's OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1
    upstream_key: str | None = None  # sent to the upstream as "Authorization: Bearer ..."
    upstream_timeout: float = 120.0  # seconds to connect, and between two reads of the upstream
    on_flag: str = "cut"
    care_retries: int = 2  # flagged continuations before CARE gives up and cuts
    refusal_text: str = DEFAULT_REFUSAL  # "" sends no text with a cut
    holdback: int = 0  # judged tokens held back beyond what the debounce needs
    max_event: int = 8 << 20  # bytes of one upstream SSE event; more ends the stream with an error

    def __post_init__(self):
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"--upstream must be an http(s) URL such as http://127.0.0.1:11434/v1, "
                             f"got {self.upstream!r}")
        if self.on_flag not in ON_FLAG:
            raise UsageError(f"--on-flag must be one of {ON_FLAG}, got {self.on_flag!r}")
        if self.care_retries < 0 or self.holdback < 0:
            raise UsageError("--care-retries and --holdback must not be negative")
        if not self.upstream_timeout > 0:
            raise UsageError(f"--upstream-timeout must be positive, got {self.upstream_timeout}")
        if self.upstream_key is not None and not self.upstream_key.strip():
            raise UsageError("--upstream-key is empty")

    @property
    def base(self) -> str:
        return self.upstream.rstrip("/")
