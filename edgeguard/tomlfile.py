"""Reading the project's TOML files (registry, policies) with one-line errors."""

from __future__ import annotations

from pathlib import Path

from edgeguard.errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def read_toml(path: Path, what: str) -> dict:
    """The parsed file; a UsageError naming the file for unreadable or malformed TOML."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read {what}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path}: malformed TOML: {error}") from None
