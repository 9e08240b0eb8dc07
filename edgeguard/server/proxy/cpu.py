"""The guard shares its CPU with the LLM it guards: its llama.cpp threads sleep while they wait.

llama.cpp's CPU backend (as llama-cpp-python's wheels build it) runs each decode on OpenMP
threads that, by default, spin between operations. On cores that nothing else wants that is a
little faster; on cores shared with an LLM server (or anything else busy) a spinning thread
burns the time slice the thread it waits for needs, and one decode of a single token took
0.5 to 0.8 s instead of a few ms on a loaded 2-core machine: the stalls a proxied stream showed
between chunks. Passive waiting (``OMP_WAIT_POLICY=PASSIVE``) removes them. OpenMP reads the
setting once, when llama.cpp's library loads, so it is set before any model is loaded; a value
the user set is kept.
"""

from __future__ import annotations

import os
import sys

POLICY = "OMP_WAIT_POLICY"


def share_cpu() -> bool:
    """Make the guard's OpenMP threads wait passively unless the user chose otherwise; False
    when llama.cpp is already loaded (too late to change)."""
    if "llama_cpp" in sys.modules:
        return False
    os.environ.setdefault(POLICY, "PASSIVE")
    return True
