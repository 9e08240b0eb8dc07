"""Every call that differs between Linux, macOS and Windows, each behind one small function with
a working fallback; the rest of edgeguard calls these instead of the platform's API.

``files`` positioned reads and binary-mode opens; ``locks`` a scan output's writer lock;
``memory`` giving the C heap back; ``console`` a missing stderr and JSON whatever the code page;
``paths`` file names handed to llama.cpp; ``selfpython`` a Python for the doctor's self-test and
how a child died; ``net`` a listening socket of one's own and the signals that stop a server.
"""
