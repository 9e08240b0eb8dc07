"""The upstream LLM server, over one shared ``httpx.AsyncClient``: chat requests (streamed, or
a whole answer read with a size cap), the model list, and the one-time probe of whether it
continues an assistant message.

Errors become the proxy's answers: unreachable -> 502, no answer within ``upstream_timeout`` ->
504, a redirect (not followed) -> 502, in OpenAI's error shape; an upstream 4xx/5xx is passed
through as it came.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from edgeguard.server.errors import HTTPError
from edgeguard.server.proxy.config import ProxyConfig

log = logging.getLogger("edgeguard.server")


class UpstreamStatus(Exception):
    """The upstream answered with an error status: the client gets the same status and body."""

    def __init__(self, status: int, body: bytes, content_type: str):
        super().__init__(f"the upstream answered {status}")
        self.status, self.body, self.content_type = status, body, content_type


def unreachable(error: BaseException, base: str) -> HTTPError:
    """The answer for a failed upstream call."""
    if isinstance(error, httpx.TimeoutException):
        return HTTPError(504, f"the upstream {base} did not answer in time ({type(error).__name__})",
                         "upstream_timeout", "server_error")
    return HTTPError(502, f"cannot reach the upstream {base} ({type(error).__name__}: {error})",
                     "upstream_unreachable", "server_error")


class Upstream:
    def __init__(self, config: ProxyConfig):
        self.config = config
        headers = {"Authorization": f"Bearer {config.upstream_key}"} if config.upstream_key else {}
        timeout = httpx.Timeout(config.upstream_timeout)
        # No connection limit: each live answer holds one upstream connection for its duration.
        self.client = httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))
        self._continues: dict[str, bool] | None = None

    async def close(self) -> None:
        await self.client.aclose()

    async def open_chat(self, body: dict[str, Any]) -> httpx.Response:
        """Send a chat request; the response is open (its body unread) and 2xx, else
        ``UpstreamStatus`` or an ``HTTPError`` (502/504). The caller closes it."""
        request = self.client.build_request("POST", f"{self.config.base}/chat/completions", json=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise unreachable(e, self.config.base) from e
        if 300 <= response.status_code < 400:  # not followed: the chat would go where nobody asked
            where = response.headers.get("location")
            await response.aclose()
            target = f" to {where}" if where else ""
            raise HTTPError(502, f"the upstream answered {response.status_code} (a redirect{target}); give "
                                 "--upstream the URL it redirects to", "upstream_invalid", "server_error")
        if response.status_code >= 400:
            try:
                raw = await response.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await response.aclose()
            raise UpstreamStatus(response.status_code, raw[: 1 << 20],
                                 response.headers.get("content-type", "application/json"))
        return response

    async def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat request's whole (not streamed) answer object, at most ``max_event`` bytes;
        anything else is a 502 ``upstream_invalid``."""
        response = await self.open_chat(body)
        try:
            raw = bytearray()
            async for part in response.aiter_bytes():
                raw += part
                if len(raw) > self.config.max_event:
                    raise HTTPError(502, f"the upstream's answer is larger than {self.config.max_event} bytes",
                                    "upstream_invalid", "server_error")
        except httpx.HTTPError as e:
            raise unreachable(e, self.config.base) from e
        finally:
            await response.aclose()
        try:
            answer = json.loads(raw)
        except ValueError as e:
            raise HTTPError(502, "the upstream's answer is not JSON", "upstream_invalid", "server_error") from e
        if not isinstance(answer, dict):
            raise HTTPError(502, "the upstream's answer is not a JSON object", "upstream_invalid", "server_error")
        return answer

    async def models(self) -> tuple[int, bytes, str]:
        try:
            response = await self.client.get(f"{self.config.base}/models")
        except httpx.HTTPError as e:
            raise unreachable(e, self.config.base) from e
        return response.status_code, response.content, response.headers.get("content-type", "application/json")

    async def continues(self) -> dict[str, bool]:
        """``{"continues": bool, "vllm": bool}``: whether this upstream continues a final
        assistant message (probed once, by the endpoints only those servers have)."""
        if self._continues is None:
            self._continues = await self._probe()
            if not self._continues["continues"]:
                log.warning("--on-flag care: the upstream %s is not a server known to continue an assistant "
                            "message (llama.cpp's llama-server, Ollama, vLLM); flagged answers are cut",
                            self.config.base)
        return self._continues

    async def _probe(self) -> dict[str, bool]:
        root = self.config.base.removesuffix("/v1")

        async def get_json(url: str) -> Any:
            try:
                response = await self.client.get(url, timeout=min(5.0, self.config.upstream_timeout))
                return response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                return None

        props = await get_json(f"{root}/props")
        if isinstance(props, dict) and ("default_generation_settings" in props or "chat_template" in props):
            return {"continues": True, "vllm": False}  # llama.cpp's llama-server
        version = await get_json(f"{root}/api/version")
        if isinstance(version, dict) and "version" in version:
            return {"continues": True, "vllm": False}  # Ollama
        models = await get_json(f"{self.config.base}/models")
        data = models.get("data") if isinstance(models, dict) else None
        if isinstance(data, list) and any(isinstance(m, dict) and m.get("owned_by") == "vllm" for m in data):
            return {"continues": True, "vllm": True}
        return {"continues": False, "vllm": False}
