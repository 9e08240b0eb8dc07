"""`edgeguard serve --upstream` in front of llama-cpp-python's own OpenAI-compatible server
(`python -m llama_cpp.server`) serving a tiny random Qwen3 GGUF the test writes: with nothing
flagged, the official `openai` client (sync and async, streamed and not) receives exactly the
text the upstream gives when asked directly with the same seed."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.fixtures.converted import converted
from tests.fixtures.tiny_gguf import write_random_qwen3_gguf
from tests.fixtures.trained import trained_stream_checkpoint
from tests.test_server import Server

pytestmark = [pytest.mark.server, pytest.mark.slow]

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPT = "How do I bake a lemon cake?"
# A random model repeats its last token at low temperature (the tied embedding dominates), so
# sample flat; the seed makes the upstream's answer reproducible.
SAMPLING = {"temperature": 100.0, "top_p": 1.0, "max_tokens": 40, "seed": 7}
EXTRA = {"top_k": 0, "min_p": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    gguf = tmp_path_factory.mktemp("llm") / "llm.gguf"
    write_random_qwen3_gguf(gguf, n_vocab=600, head_dim=32, ffn=256, seed=3, chat_template=TEMPLATE)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", "1", "--n_ctx", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"llama_cpp.server did not start: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def proxy(llama_server, tmp_path_factory):
    guard = str(converted(trained_stream_checkpoint(), ("f16",)))
    srv = Server("--stream-model", guard, "--upstream", llama_server,
                 env={"EDGEGUARD_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})
    yield srv
    assert srv.stop() == 0, srv.stderr


@pytest.fixture(scope="module")
def direct(llama_server):
    """The upstream's own answers (whole, streamed), asked without the proxy. They may differ:
    llama-cpp-python's stream drops a character whose bytes span two tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=llama_server, api_key="unused", max_retries=0)
    text = _ask(client, False).choices[0].message.content
    assert len(text) > 20 and len(set(text)) > 5  # a varied text, not one token repeated
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(client, True) if c.choices)
    return text, streamed


def _ask(client, stream: bool):
    return client.chat.completions.create(model="llm", messages=[{"role": "user", "content": PROMPT}],
                                          stream=stream, extra_body=EXTRA, **SAMPLING)


def test_sync_clients_get_the_upstreams_text(proxy, direct):
    from openai import OpenAI

    client = OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
    whole = _ask(client, False)
    assert whole.choices[0].message.content == direct[0]
    assert whole.model_extra["edgeguard"]["action"] == "none"
    chunks = list(_ask(client, True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct[1]
    assert chunks[-1].model_extra["edgeguard"]["answer"]["flagged"] is False
    assert chunks[-1].choices[0].finish_reason == "length"


def test_async_clients_get_the_upstreams_text(proxy, direct):
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
        whole = await _ask(client, False)
        texts = []
        async for chunk in await _ask(client, True):
            if chunk.choices:
                texts.append(chunk.choices[0].delta.content or "")
        await client.close()
        return whole.choices[0].message.content, "".join(texts)

    whole, streamed = asyncio.run(main())
    assert (whole, streamed) == direct


def test_models_are_the_upstreams(proxy, llama_server):
    from openai import OpenAI

    ours = OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0).models.list()
    theirs = OpenAI(base_url=llama_server, api_key="unused", max_retries=0).models.list()
    assert [m.id for m in ours.data] == [m.id for m in theirs.data]
