"""A Python interpreter for the doctor's self-test child, and how a child process died.

The self-test runs ``PYTHON -m edgeguard.selftest`` so that a native crash ends the child, not
the caller. In a frozen app (PyInstaller, py2app, Briefcase) ``sys.executable`` is the app
itself, which would start the app again: there the self-test needs ``EDGEGUARD_PYTHON``, a
Python with edgeguard installed, or is skipped with that reason."""

from __future__ import annotations

import os
import signal
import sys

PYTHON_ENV = "EDGEGUARD_PYTHON"

# NTSTATUS codes a native crash ends a Windows process with (its exit status, unsigned).
_WINDOWS_CRASHES = {
    0xC0000005: "an access violation",
    0xC000001D: "an illegal instruction",
    0xC00000FD: "a stack overflow",
    0xC0000409: "a fail-fast abort (stack buffer overrun)",
    0xC0000374: "heap corruption",
    0xC0000094: "an integer division by zero",
}


def self_test_python() -> tuple[str | None, str]:
    """The interpreter to run the self-test with, and where it came from (None: why there is none)."""
    chosen = os.environ.get(PYTHON_ENV)
    if chosen:
        return chosen, PYTHON_ENV
    if not getattr(sys, "frozen", False) and sys.executable:
        return sys.executable, "this Python"
    return None, (f"this is a frozen app, whose executable is the app and not Python: set {PYTHON_ENV} to a "
                  "Python that has edgeguard installed to run the self-test")


def crash_name(returncode: int) -> str | None:
    """What killed a child that crashed (a POSIX signal, a Windows exception); None when it exited."""
    if -256 < returncode < 0:  # subprocess's "killed by signal N"
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    status = returncode & 0xFFFFFFFF
    if status >= 0xC0000000:  # an NTSTATUS error: POSIX exit codes stop at 255
        return f"{_WINDOWS_CRASHES.get(status, 'a Windows exception')} (0x{status:08X})"
    return None
