"""`edgeguard eval --reference`: the original Hugging Face checkpoint run by transformers and
PyTorch in float32, the most precise baseline a quant can be compared with.

It reads verdicts the way the engines do (Gen: restricted softmax over the label, category and
refusal first tokens; Stream: the heads on every token's last hidden state, then the official
debounce), but tokenizes with the checkpoint's own Hugging Face tokenizer. Needs torch and
transformers (the ``test`` extra); everything is imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeguard.engines.debounce import Debouncer
from edgeguard.errors import ModelError, UsageError
from edgeguard.policy import KNOWN_CATEGORIES, NO_CATEGORY, decide, load_policy
from edgeguard.verdict import LABELS, TokenVerdict, Verdict

_PROBE = "\ue000edgeguard-eval-response\ue001"
_JAILBREAK = "Jailbreak"


def _torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UsageError("--reference needs torch and transformers: pip install torch transformers") from e
    return torch, transformers


def load_reference(folder: str | Path, policy: str = "strict"):
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--reference {folder}: not a checkpoint folder (config.json: {e})") from e
    if "Qwen3ForGuardModel" in config.get("architectures", []):
        return _TorchStream(folder, config, policy)
    return _TorchGen(folder, policy)


class _Reference:
    engine = "gen"
    model: Any  # the transformers model (set by the subclasses); None once closed

    def __init__(self, folder: Path, policy: str):
        self.torch, transformers = _torch()
        self.name = f"reference:{folder.name}"
        self.policy = load_policy(policy)
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise ModelError(f"--reference {folder}: cannot load the tokenizer: {e}") from e

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def _render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False)

    def _verdict(self, label, scores, category, category_scores, refusal=None) -> Verdict:
        return Verdict(label=label, scores=scores, categories=() if category in (None, NO_CATEGORY) else (category,),
                       category_scores=category_scores, refusal=refusal,
                       flagged=decide(self.policy, label, category_scores), policy=self.policy.name,
                       engine=self.engine, model=self.name)

    def count_before(self, prompt: list[dict]) -> int:
        """Template tokens before the response's first token."""
        text = self._render(prompt + [{"role": "assistant", "content": _PROBE}])
        return len(self._ids(text[: text.index(_PROBE)]))

    def close(self) -> None:
        self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TorchGen(_Reference):
    engine = "gen"

    def __init__(self, folder: Path, policy: str):
        super().__init__(folder, policy)
        transformers = _torch()[1]
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=self.torch.float32).eval()

    def _read(self, ids: list[int], names) -> dict[str, float]:
        first = {n: self._ids(" " + n)[0] for n in names}
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids])).logits[0, -1]
        probs = self.torch.softmax(logits[list(first.values())].double(), -1).tolist()
        return dict(zip(first, probs))

    def check(self, messages: list[dict]) -> Verdict:
        ids = self._ids(self._render(messages))
        response = messages[-1]["role"] == "assistant"
        scores = self._read(ids + self._ids("Safety:"), LABELS)
        label = max(scores, key=lambda k: scores[k])
        names = [c for c in KNOWN_CATEGORIES if not (response and c == _JAILBREAK)] + [NO_CATEGORY]
        head = f"Safety: {label}\nCategories:"
        category_scores = self._read(ids + self._ids(head), names)
        category = max(category_scores, key=lambda k: category_scores[k])
        refusal = None
        if response:
            refusal_scores = self._read(ids + self._ids(f"{head} {category}\nRefusal:"), ("Yes", "No"))
            refusal = max(refusal_scores, key=lambda k: refusal_scores[k])
        return self._verdict(label, scores, category, category_scores, refusal)


class _TorchStream(_Reference):
    engine = "stream"

    def __init__(self, folder: Path, config: dict, policy: str):
        super().__init__(folder, policy)
        torch, transformers = _torch()
        from safetensors.torch import load_file

        cfg = transformers.Qwen3Config.from_pretrained(str(folder))
        weights = {}
        for f in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        self.model = transformers.Qwen3Model(cfg).to(torch.float32).eval()
        backbone = {k[len("model."):]: v.float() for k, v in weights.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(backbone, strict=False)
        if [k for k in missing if "rotary" not in k] or unexpected:
            raise ModelError(f"--reference {folder}: backbone tensors do not match its config")
        self.heads = {k: v.float() for k, v in weights.items() if not k.startswith("model.")}
        self.eps = float(cfg.rms_norm_eps)
        self.maps = {k: [config[f"{k}_map"][str(i)] for i in range(len(config[f"{k}_map"]))]
                     for k in ("response_risk_level", "response_category", "query_risk_level", "query_category")}

    def _head(self, h, prefix: str, name: str):
        x = h @ self.heads[f"{prefix}risk_level_category_pre.weight"].T
        x = x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = x * self.heads[f"{prefix}risk_level_category_layernorm.weight"]
        return self.torch.softmax((x @ self.heads[f"{name}.weight"].T).double(), -1)

    def _hidden(self, ids: list[int]):
        with self.torch.no_grad():
            return self.model(input_ids=self.torch.tensor([ids])).last_hidden_state[0]

    def _prompt_ids(self, prompt: list[dict]) -> tuple[list[int], int]:
        text = self._render(prompt + [{"role": "assistant", "content": _PROBE}])
        ids = self._ids(text[: text.index(_PROBE)])
        end = self.tok.convert_tokens_to_ids("<|im_end|>")
        return ids, max(i for i, t in enumerate(ids) if t == end)

    def _query(self, h) -> Verdict:
        scores = dict(zip(self.maps["query_risk_level"], self._head(h, "query_", "query_risk_level_head").tolist()))
        cats = dict(zip(self.maps["query_category"], self._head(h, "query_", "query_category_head").tolist()))
        label = max(scores, key=lambda k: scores[k])
        return self._verdict(label, scores, None if label == "Safe" else max(cats, key=lambda k: cats[k]), cats)

    def check(self, prompt: list[dict]) -> Verdict:
        ids, end = self._prompt_ids(prompt)
        return self._query(self._hidden(ids[: end + 1])[end])

    def session(self, prompt: list[dict]) -> _Session:
        return _Session(self, prompt)


class _Session:
    """The whole response in one forward when it is finished (the reference need not stream)."""

    def __init__(self, ref: _TorchStream, prompt: list[dict]):
        self._ref, self._prompt, self._text = ref, prompt, ""
        self.verdicts: list[TokenVerdict] = []
        self._debouncer = Debouncer()

    def feed_text(self, text: str) -> None:
        self._text += text

    def finish(self) -> None:
        ref = self._ref
        head, _ = ref._prompt_ids(self._prompt)
        response = ref._ids(self._text)
        h = ref._hidden(head + response)[len(head):]
        risk = ref._head(h, "", "risk_level_head")
        category = ref._head(h, "", "category_head").argmax(-1).tolist()
        names, cats = ref.maps["response_risk_level"], ref.maps["response_category"]
        for i, (token, p, c) in enumerate(zip(response, risk.tolist(), category)):
            scores = dict(zip(names, p))
            label = max(scores, key=lambda k: scores[k])
            cat = None if label == "Safe" else cats[c]
            self.verdicts.append(TokenVerdict(index=i, token=token, text="", scores=scores, label=label, category=cat))
            self._debouncer.push(label, cat)

    @property
    def state(self):
        return self._debouncer.state

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
