"""`edgeguard serve --upstream URL`: an OpenAI-compatible chat proxy that judges every token.

``config`` (the options), ``conversation`` (an OpenAI chat request as a guard conversation),
``sse`` (server-sent events in and out), ``upstream`` (the httpx client to the LLM server),
``release`` (which judged text may reach the client), ``care`` (the continuation request after
a flag), ``chat`` (the endpoints), ``answer`` (a streamed answer judged token by token),
``whole`` (an answer judged whole), ``shapes`` (the OpenAI objects the client gets),
``response`` (the streamed response that watches for a disconnect), ``metrics``.
"""

from edgeguard.server.proxy.config import ProxyConfig

__all__ = ["ProxyConfig"]
