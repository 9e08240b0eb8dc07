"""OpenAI's moderation contract on top of Qwen3Guard verdicts (``POST /v1/moderations``).

Qwen3Guard and OpenAI name their categories differently. Each OpenAI category takes the
Qwen3Guard categories listed for it below; an OpenAI category with no counterpart stays
``false`` / ``0.0``. The table is the one documented in docs/server.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from edgeguard.errors import UsageError
from edgeguard.verdict import Verdict

# OpenAI category -> the Qwen3Guard categories that count for it.
OPENAI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harassment": ("Unethical Acts",),
    "harassment/threatening": (),
    "hate": ("Unethical Acts",),
    "hate/threatening": (),
    "illicit": ("Non-violent Illegal Acts",),
    "illicit/violent": (),
    "self-harm": ("Suicide & Self-Harm",),
    "self-harm/intent": (),
    "self-harm/instructions": (),
    "sexual": ("Sexual Content or Sexual Acts",),
    "sexual/minors": (),
    "violence": ("Violent",),
    "violence/graphic": (),
}
# Qwen3Guard categories no OpenAI key covers; they still count for "flagged" and appear in the
# extra "qwen3guard" field of each result.
UNMAPPED = ("PII", "Politically Sensitive Topics", "Copyright Violation", "Jailbreak")


# OpenAI's moderation model names, as clients and gateways send them (LiteLLM also with its
# "openai/" provider prefix): each means this server's default moderation model.
OPENAI_MODELS = ("omni-moderation-latest", "omni-moderation-2024-09-26", "text-moderation-latest",
                 "text-moderation-stable")


def model_alias(model: Any) -> Any:
    """The model a moderation request names: None (the default model) for OpenAI's names."""
    if isinstance(model, str) and model.removeprefix("openai/") in OPENAI_MODELS:
        return None
    return model


class ImageInput(UsageError):
    """An image part in a moderation input: Qwen3Guard reads text only."""


def parse_inputs(value: Any) -> list[str]:
    """The texts to judge, one per result: ``input`` is a string, a list of strings, or a list
    of ``{"type": "text", "text": ...}`` parts (OpenAI's multi-modal form: its text parts are
    one input, joined by newlines, giving one result)."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        texts = list(value)
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        parts = []
        for i, part in enumerate(value):
            kind = part.get("type")
            if kind == "image_url" or "image_url" in part:
                raise ImageInput(f"input[{i}] is an image; this server judges text only")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise UsageError(f'input[{i}] must be {{"type": "text", "text": "..."}}')
            parts.append(part["text"])
        texts = ["\n".join(parts)]
    else:
        raise UsageError("'input' must be a string, a list of strings or a list of text parts")
    for i, text in enumerate(texts):
        if not text.strip():
            raise UsageError(f"input {i} is empty")
    return texts


def result(verdict: Verdict) -> dict[str, Any]:
    """One OpenAI moderation result, with Qwen3Guard's own verdict under "qwen3guard"."""
    found = set(verdict.categories)
    categories, scores = {}, {}
    for key, ours in OPENAI_CATEGORIES.items():
        categories[key] = verdict.flagged and any(c in found for c in ours)
        scores[key] = max((float(verdict.category_scores.get(c, 0.0)) for c in ours), default=0.0)
    return {
        "flagged": verdict.flagged,
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": {key: ["text"] for key in OPENAI_CATEGORIES},
        "qwen3guard": verdict.to_dict(),
    }


def response(model: str, verdicts: list[Verdict]) -> dict[str, Any]:
    return {"id": f"modr-{uuid.uuid4().hex}", "model": model, "results": [result(v) for v in verdicts]}
