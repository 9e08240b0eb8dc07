"""The guard shares its CPU with the LLM it guards: its llama.cpp threads sleep while they wait.

llama.cpp's CPU backend (as llama-cpp-python's wheels build it) runs each decode on OpenMP
threads that, by default, spin between operations. On cores that nothing else wants that is a
little faster; on cores shared with an LLM server (or anything else busy) a spinning thread
burns the time slice the thread it waits for needs, and one decode of a single token took
0.5 to 0.8 s instead of a few ms on a loaded 2-core machine: the stalls a proxied stream showed
between chunks. Passive waiting (``OMP_WAIT_POLICY=PASSIVE``) removes them, but a thread that
sleeps at once wakes late at each of the hundreds of barriers inside one decode: a Stream step
of the random 0.6B Q4_K_M took 44.9 ms instead of 20.5 on a quiet 2-core AMD EPYC. A short spin
first (``GOMP_SPINCOUNT=10000``, libgomp's; a few microseconds) keeps the step at 19.5 ms and
still sleeps between decodes. OpenMP reads both once, when llama.cpp's library loads, so they
are set before any model is loaded; values the user set are kept.
"""

from __future__ import annotations

import os
import sys

POLICY = "OMP_WAIT_POLICY"
SPIN = "GOMP_SPINCOUNT"  # libgomp's; other OpenMP runtimes ignore it
SPIN_COUNT = "10000"


def share_cpu() -> bool:
    """Make the guard's OpenMP threads wait passively unless the user chose otherwise; False
    when llama.cpp is already loaded (too late to change)."""
    if "llama_cpp" in sys.modules:
        return False
    os.environ.setdefault(POLICY, "PASSIVE")
    os.environ.setdefault(SPIN, SPIN_COUNT)
    return True
