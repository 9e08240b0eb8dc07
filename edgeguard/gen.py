"""Gen engine: Qwen3Guard-Gen verdicts read from next-token probabilities, no generation.

One forward over the rendered conversation + "Safety:" gives the label distribution; two short
continuations give the category and (for responses) the refusal. The part of the rendering
before the conversation is the same for every input: its KV cache is computed once, persisted
beside the model, and reused by every check.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from edgeguard.backend import Backend, choose_device
from edgeguard.errors import InputTooLong, ModelError
from edgeguard.manifest import Manifest
from edgeguard.scoring import common_prefix, softmax
from edgeguard.policy import Policy, decide, load_policy
from edgeguard.template import ChatTemplate, Message, as_messages, tokenize_pieces
from edgeguard.verdict import LABELS, Verdict

log = logging.getLogger("edgeguard")

JAILBREAK = "Jailbreak"
NONE = "None"
GUESS_LABEL = "Safe"
# The longest read-out continuation: " <label>\nCategories: <category>\nRefusal:".
READOUT_MARGIN = 32



# A prompt check is ~300 template tokens + the text: start with room for that and grow on demand.
INITIAL_CTX = 1024
BATCH = 256  # tokens per llama.cpp decode: bounds the compute buffer


@dataclass(frozen=True)
class GenOptions:
    n_ctx: int | None = None  # the largest context to allow; default: the manifest's
    n_threads: int | None = None
    device: str = "auto"  # "auto": the GPU when this llama.cpp build can offload; "cpu"; "gpu"
    n_gpu_layers: int | None = None  # on the GPU: how many layers (default all)
    kv_type: str = "f16"  # "q8_0" halves the KV cache (but slows prefill on CPU)
    # Gen is prefill-bound: llama.cpp's repacked weights barely help it and cost ~200 MB.
    repack: bool = False
    prefix_cache: Path | None = None  # folder for persisted prefix states; None: off
    verbose: bool = False


class GenGuard:
    """A loaded Gen model. ``check()`` returns a Verdict; use as a context manager."""

    engine = "gen"

    def __init__(self, folder: Path, manifest: Manifest, quant: str, *, policy: Policy | str = "strict",
                 options: GenOptions = GenOptions()):
        if manifest.kind != "gen":
            raise ModelError(f"{manifest.name} is a {manifest.kind} model, not a Gen model")
        self.name = manifest.name
        self.manifest = manifest
        self.policy = load_policy(policy) if isinstance(policy, str) else policy
        gguf = manifest.file_for("model", quant)
        manifest.check_sizes(folder, [gguf])
        self._model_sha = manifest.files[gguf]["sha256"]
        self._options = options
        self.device = choose_device(options.device, n_gpu_layers=options.n_gpu_layers)
        self._gguf = folder / gguf
        # The KV cache is allocated up front (112 KiB a token at 0.6B): start small, grow on demand.
        self._max_ctx = options.n_ctx or manifest.context_length
        self._backend = self._new_backend(min(self._max_ctx, INITIAL_CTX))
        try:
            source = self._backend.vocab.meta("tokenizer.chat_template")
            if not source:
                raise ModelError(f"{gguf} carries no chat template")
            self._template = ChatTemplate(source)
            self._categories = list(manifest.labels["category"])
            self._label_ids = self._first_tokens(LABELS)
            self._refusal_ids = self._first_tokens(manifest.labels.get("refusal", ["Yes", "No"]))
            self._category_ids = self._first_tokens(self._categories + [NONE])
            self._kv: list[int] = []  # the tokens whose states the backend's cache holds
            self._prefixes = {mode: self._fixed_prefix(mode) for mode in ("prompt", "response")}
        except BaseException:
            self._backend.close()
            raise

    # -- setup -----------------------------------------------------------------------------
    def _new_backend(self, n_ctx: int) -> Backend:
        o = self._options
        return Backend(self._gguf, n_ctx=n_ctx, mode="logits", n_batch=BATCH, n_threads=o.n_threads,
                       n_gpu_layers=self.device.n_gpu_layers, kv_type=o.kv_type, repack=o.repack, verbose=o.verbose)

    def _ensure_context(self, n_tokens: int) -> None:
        needed = n_tokens + READOUT_MARGIN
        if needed <= self._backend.n_ctx:
            return
        if needed > self._max_ctx:
            raise InputTooLong(
                f"the conversation needs {n_tokens} tokens with the template, more than the "
                f"{self._max_ctx - READOUT_MARGIN} this model allows; shorten the text "
                "(edgeguard never truncates silently)"
            )
        size = min(self._max_ctx, 1 << (needed - 1).bit_length())
        log.info("growing the context to %d tokens", size)
        old = self._backend
        self._backend = self._new_backend(size)
        if not self._backend.restore(old.state(), old.n_past):
            self._kv = []
        old.close()

    def _first_tokens(self, names: Sequence[str]) -> dict[str, int]:
        ids = {name: self._backend.vocab.tokenize(" " + name)[0] for name in names}
        if len(set(ids.values())) != len(ids):
            raise ModelError(f"the first tokens of {list(names)} are not distinct; cannot score them")
        return ids

    def tokens(self, prompt: str | Sequence, response: str | None = None) -> list[int]:
        """The token ids of a conversation's rendering (what ``check`` feeds before "Safety:")."""
        return self._tokens(as_messages(prompt, response))

    def _tokens(self, messages: Sequence[Message]) -> list[int]:
        vocab = self._backend.vocab
        return tokenize_pieces(self._template.pieces(messages), vocab.tokenize, vocab.token_id)

    def _fixed_prefix(self, mode: str) -> list[int]:
        """Tokens every conversation of this mode starts with (two probes' common prefix)."""
        def probe(text):
            msgs = [Message("user", text)] + ([Message("assistant", text)] if mode == "response" else [])
            return self._tokens(msgs)

        a, b = probe("a"), probe("b")
        return a[: common_prefix(a, b)]

    def _prefix_file(self, tokens: list[int]) -> Path | None:
        folder = self._options.prefix_cache
        if folder is None:
            return None
        key = hashlib.sha256(self._model_sha.encode() + np.asarray(tokens, np.int32).tobytes()).hexdigest()[:24]
        return Path(folder) / f"prefix-{key}.kv"

    def _restore_prefix(self, tokens: list[int]) -> None:
        """Fill the cache with ``tokens`` from disk, or compute them and save them."""
        path = self._prefix_file(tokens)
        if path is not None and self._backend.load_prefix(path) and self._backend.n_past == len(tokens):
            self._kv = list(tokens)
            return
        self._backend.truncate(0)
        self._kv = []
        self._backend.eval(tokens, outputs=())
        self._kv = list(tokens)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._backend.save_prefix(path)
            except OSError as e:
                log.warning("could not persist the prefix cache at %s: %s", path, e)

    # -- scoring ---------------------------------------------------------------------------
    def _forward(self, tokens: list[int], at: Sequence[int] | None = None) -> np.ndarray:
        """Next-token logits after ``tokens[: i + 1]`` for each i in ``at`` (default: the last),
        reusing whatever cached prefix matches."""
        at = [len(tokens) - 1] if at is None else list(at)
        keep = min(common_prefix(self._kv, tokens), min(at))
        if keep < self._backend.n_past:
            self._backend.truncate(keep)
        self._kv = self._kv[:keep]
        logits = self._backend.eval(tokens[keep:], outputs=[i - keep for i in at])
        self._kv = list(tokens)
        return logits

    def _read(self, logits: np.ndarray, ids: dict[str, int]) -> dict[str, float]:
        probs = softmax(logits[list(ids.values())])
        return dict(zip(ids, probs.tolist()))

    def _continue(self, tokens: list[int], text: str) -> list[int]:
        return tokens + self._backend.vocab.tokenize(text)

    def check(self, prompt: str | Sequence, response: str | None = None) -> Verdict:
        """Verdict on a prompt, a prompt+response, or a list of {role, content} messages."""
        messages = as_messages(prompt, response)
        mode = "response" if messages[-1].role == "assistant" else "prompt"
        t0 = time.perf_counter()
        tokens = self._tokens(messages)
        self._ensure_context(len(tokens))
        prefix = self._prefixes[mode]
        if tokens[: len(prefix)] == prefix and common_prefix(self._kv, prefix) < len(prefix):
            self._restore_prefix(prefix)
        t1 = time.perf_counter()
        # One decode reads the label and, speculating on the most common verdict (Safe, no
        # category), the category and refusal too; a wrong guess costs one short decode more.
        labelled = self._continue(tokens, "Safety:")
        guess = self._continue(labelled, f" {GUESS_LABEL}\nCategories:")
        at = [len(labelled) - 1, len(guess) - 1]
        if mode == "response":
            guess = self._continue(guess, f" {NONE}\nRefusal:")
            at.append(len(guess) - 1)
        logits = self._forward(guess, at)
        scores = self._read(logits[0], self._label_ids)
        label = max(scores, key=scores.get)
        t2 = time.perf_counter()
        names = [c for c in self._categories if mode == "prompt" or c != JAILBREAK] + [NONE]
        ids = {n: self._category_ids[n] for n in names}
        tokens = self._continue(labelled, f" {label}\nCategories:")
        category_logits = logits[1] if label == GUESS_LABEL else self._forward(tokens)[0]
        category_scores = self._read(category_logits, ids)
        category = max(category_scores, key=category_scores.get)
        refusal = None
        if mode == "response":
            tokens = self._continue(tokens, f" {category}\nRefusal:")
            guessed = label == GUESS_LABEL and category == NONE
            refusal_scores = self._read(logits[2] if guessed else self._forward(tokens)[0], self._refusal_ids)
            refusal = max(refusal_scores, key=refusal_scores.get)
        t3 = time.perf_counter()
        categories = () if category == NONE else (category,)
        return Verdict(
            label=label,
            scores=scores,
            categories=categories,
            category_scores=category_scores,
            refusal=refusal,
            flagged=decide(self.policy, label, category_scores),
            policy=self.policy.name,
            engine=self.engine,
            model=self.name,
            timings={"prefix_ms": (t1 - t0) * 1e3, "label_ms": (t2 - t1) * 1e3, "readout_ms": (t3 - t2) * 1e3},
        )

    def check_many(self, items: Iterable) -> Iterator[Verdict]:
        """Lazy verdicts for prompts, (prompt, response) pairs or message lists."""
        for item in items:
            if isinstance(item, tuple):
                yield self.check(*item)
            else:
                yield self.check(item)

    def generate(self, prompt: str | Sequence, response: str | None = None, max_new_tokens: int = 128) -> str:
        """The official way: greedy decoding of the verdict text (for comparison and debugging)."""
        tokens = self._tokens(as_messages(prompt, response))
        self._ensure_context(len(tokens) + max_new_tokens)
        vocab = self._backend.vocab
        stop = {vocab.token_id("<|im_end|>"), vocab.token_id("<|endoftext|>")}
        out: list[int] = []
        logits = self._forward(tokens)[0]
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(logits))
            if nxt in stop:
                break
            out.append(nxt)
            tokens = tokens + [nxt]
            logits = self._forward(tokens)[0]
        return vocab.detokenize(out).decode("utf-8", errors="replace")

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "GenGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
