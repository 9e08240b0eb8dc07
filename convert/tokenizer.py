"""The tokenizer of a checkpoint (tokenizer.json + tokenizer_config.json) in GGUF terms."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType

from edgeguard.errors import ConversionError


@dataclass(frozen=True)
class TokenizerData:
    tokens: list[str]  # id order, padded with unused placeholders to the embedding rows
    types: list[int]
    merges: list[str]
    eos_id: int
    pad_id: int | None
    bos_id: int | None
    chat_template: str | None
    special: dict[str, int]  # added tokens by content


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path.name}: cannot parse ({e})") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path.name}: expected a JSON object")
    return data


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def read_tokenizer(folder: Path, n_rows: int) -> TokenizerData:
    tok = _read_json(folder / "tokenizer.json")
    config = _read_json(folder / "tokenizer_config.json")
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError("tokenizer.json: expected a byte-level BPE model with a vocab")
    vocab: dict[int, str] = {}
    for text, idx in model["vocab"].items():
        vocab[int(idx)] = text
    types = {i: TokenType.NORMAL for i in vocab}
    special: dict[str, int] = {}
    for added in tok.get("added_tokens") or []:
        idx, content = int(added["id"]), added["content"]
        vocab[idx] = content
        types[idx] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        special[content] = idx
    if not vocab or max(vocab) >= n_rows:
        raise ConversionError(
            f"tokenizer.json: token ids go up to {max(vocab, default=-1)}, but the embedding has {n_rows} rows"
        )
    tokens, token_types = [], []
    for i in range(n_rows):
        if i in vocab:
            tokens.append(vocab[i])
            token_types.append(int(types[i]))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(int(TokenType.UNUSED))

    merges = []
    for m in model.get("merges") or []:
        merges.append(" ".join(m) if isinstance(m, list) else m)

    def special_id(key: str) -> int | None:
        content = _token_content(config.get(key))
        if content is None:
            return None
        if content not in special and content not in model["vocab"]:
            raise ConversionError(f"tokenizer_config.json: {key} {content!r} is not a token")
        return special.get(content, model["vocab"].get(content))

    eos = special_id("eos_token")
    if eos is None:
        raise ConversionError("tokenizer_config.json: no eos_token")
    return TokenizerData(
        tokens=tokens,
        types=token_types,
        merges=merges,
        eos_id=eos,
        pad_id=special_id("pad_token"),
        bos_id=special_id("bos_token"),
        chat_template=_chat_template(folder, config),
        special=special,
    )
