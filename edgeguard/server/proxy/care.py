"""CARE: after a flag, the upstream continues the answer from its last released text.

The continuation request is the client's request with two changes: a steering instruction at
the head of the system prompt, and an assistant message holding exactly the text the client has
received (assistant prefill) as the last message, with vLLM's ``continue_final_message`` so that
vLLM continues it too. Which upstreams continue an assistant message is probed once per server
(``Capability``): llama.cpp's ``llama-server`` (``GET /props``), Ollama (``GET /api/version``),
vLLM (``owned_by: vllm`` in ``/v1/models``) do; for any other the proxy says so once and cuts.
"""

from __future__ import annotations

import copy
from typing import Any

from edgeguard.server.proxy.config import STEERING


def continuation(body: dict[str, Any], prefill: str, *, vllm: bool = False, steering: str = STEERING) -> dict[str, Any]:
    """The request that asks the upstream to continue ``prefill`` (the client's request is not
    changed). A client's own trailing assistant message is replaced: ``prefill`` starts with it.
    With no text to continue, the answer starts again under the steering instruction."""
    out = copy.deepcopy(body)
    messages = list(out["messages"])
    if messages and messages[-1].get("role") == "assistant":
        messages.pop()
    first = messages[0] if messages else None
    if first is not None and first.get("role") == "system" and isinstance(first.get("content"), str):
        messages[0] = {**first, "content": first["content"] + "\n\n" + steering}
    else:
        messages.insert(0, {"role": "system", "content": steering})
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
        if vllm:  # vLLM renders a final assistant message closed unless told to continue it
            out["continue_final_message"] = True
            out["add_generation_prompt"] = False
    out["messages"] = messages
    return out
