"""A listening socket that no other server can share, and the signals that stop a server.

``SO_REUSEADDR`` means "rebind past TIME_WAIT" on POSIX but "share a port in use" on Windows,
where two servers could then bind one port; Windows' own option, ``SO_EXCLUSIVEADDRUSE``, is
the one that refuses the second. Windows delivers no SIGTERM: a console stops a process with
Ctrl+C (SIGINT) or Ctrl+Break (SIGBREAK)."""

from __future__ import annotations

import signal
import socket


def own_port(sock: socket.socket) -> str:
    """Set ``sock`` so that its bind fails while another socket listens on the port; the option set."""
    exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)  # Windows only
    if exclusive is not None:
        sock.setsockopt(socket.SOL_SOCKET, exclusive, 1)
        return "SO_EXCLUSIVEADDRUSE"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return "SO_REUSEADDR"


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that ask a server to finish and exit on this platform."""
    names = ("SIGTERM", "SIGINT", "SIGBREAK")
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))
