"""The first command a new user runs, with nothing cached and no network: one line that says
what to do (pull when online, or --model FOLDER), exit 3, no traceback, no library's raw text."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def _closed_port() -> int:
    with socket.socket() as s:  # bound then released: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline", [False, True], ids=["no-network", "HF_HUB_OFFLINE"])
def test_check_with_nothing_cached_says_what_to_do(tmp_path, offline):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data"),
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_OFFLINE": "1" if offline else "0"}
    env.pop("EDGEGUARD_MODELS", None)
    result = subprocess.run([sys.executable, "-m", "edgeguard", "check", "How do I pick a lock?"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("edgeguard: ") for line in lines), result.stderr
    error = lines[-1]
    assert error.startswith("edgeguard: error: ")
    assert "edgeguard pull gen-0.6b" in error and "--model FOLDER" in error
    assert "Traceback" not in result.stderr
