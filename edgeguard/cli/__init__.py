"""The `edgeguard` command line (see ``commands``)."""

from edgeguard.cli.commands import main

__all__ = ["main"]
