"""The server examples of README.md and docs/server.md (curl, OpenAI client, WebSocket) run as
written against a real server; only the port differs."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess

import pytest

from tests.test_docs import example
from tests.test_server import Server, cache_env, gen_model, stream_model  # noqa: F401


@pytest.fixture(scope="module")
def server(gen_model, stream_model, cache_env):
    srv = Server("--model", gen_model, "--stream-model", stream_model, env=cache_env)
    yield srv
    assert srv.stop() == 0, srv.stderr


def on_port(code: str, port: int) -> str:
    assert "127.0.0.1:8080" in code
    return code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def run_python(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "server example", "exec"), {})
    return out.getvalue()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_example(server):
    done = subprocess.run(["bash", "-c", on_port(example("server-curl", "sh"), server.port)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["engine"] == "gen" and verdict["refusal"] in ("Yes", "No")


def test_openai_example(server):
    lines = run_python(on_port(example("server-openai", "python"), server.port)).splitlines()
    assert len(lines) == 2
    for line in lines:
        flagged, illicit, label = line.split()
        assert flagged in ("True", "False") and illicit in ("True", "False")
        assert label in ("Safe", "Unsafe", "Controversial")


def test_websocket_example(server):
    lines = run_python(on_port(example("server-websocket", "python"), server.port)).splitlines()
    assert lines and lines[-1].startswith("verdict ")
    assert all(line.split()[0] in ("flagged", "verdict") for line in lines)
