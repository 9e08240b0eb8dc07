"""Stream engine: Qwen3Guard-Stream verdicts on a prompt and on every token of a response.

The backbone GGUF (a dummy 8-token vocabulary) runs in llama.cpp on rows of the real embedding
table, which stays memory-mapped beside it; the two classification heads run in onnxruntime.
A session evaluates the rendered prompt once, then each ``feed`` appends the new response
tokens to the KV cache in ONE decode, whatever their number, and scores all of them at once.

A guard holds one KV cache, so it runs one session at a time: opening a session, or calling
``check``, ends the previous session (using it afterwards raises ``RuntimeFailure``).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeguard.backend import Backend, Vocab, choose_device
from edgeguard.debounce import Debouncer
from edgeguard.errors import InputTooLong, ModelError, RuntimeFailure, UsageError
from edgeguard.heads import Heads
from edgeguard.manifest import Manifest
from edgeguard.scoring import common_prefix, softmax
from edgeguard.policy import Policy, decide, load_policy
from edgeguard.retokenize import Retokenizer, hard_pair
from edgeguard.template import ChatTemplate, Message, as_messages, tokenize_pieces
from edgeguard.verdict import LABELS, StreamState, TokenVerdict, Verdict

IM_END = "<|im_end|>"
# Where the response starts: the rendering of a probe assistant message is cut at its content.
_PROBE = "\ue000edgeguard-response\ue001"
# The KV cache is allocated up front (~112 KiB per token for the real model at f16), so the
# context starts at INITIAL_CTX and doubles, copying the cached cells over, up to the manifest's
# context length when a conversation needs it.
INITIAL_CTX = 512
BATCH = 256  # tokens per llama.cpp decode: bounds the compute buffer



@dataclass(frozen=True)
class StreamOptions:
    n_ctx: int | None = None  # the largest context to allow; default: the manifest's
    n_threads: int | None = None
    device: str = "auto"  # "auto": the GPU when this llama.cpp build can offload; "cpu"; "gpu"
    n_gpu_layers: int | None = None  # on the GPU: how many layers (default all)
    # Per-token speed is what Stream is for: repacked weights and flash attention over an f16
    # KV cache make a decode step fastest (a q8_0 cache saves memory but costs ~15% a step).
    kv_type: str = "f16"
    repack: bool = True
    verbose: bool = False


class StreamGuard:
    """A loaded Stream model: ``check(prompt)`` and ``session(prompt)``; a context manager."""

    engine = "stream"

    def __init__(self, folder: Path, manifest: Manifest, quant: str, *, policy: Policy | str = "strict",
                 options: StreamOptions = StreamOptions()):
        if manifest.kind != "stream":
            raise ModelError(f"{manifest.name} is a {manifest.kind} model, not a Stream model")
        folder = Path(folder)
        self.name = manifest.name
        self.manifest = manifest
        labels = manifest.labels
        try:
            self._risk = {k: list(labels[f"{k}_risk_level"]) for k in ("query", "response")}
            self._categories = {k: list(labels[f"{k}_category"]) for k in ("query", "response")}
        except KeyError as e:
            raise ModelError(f"{manifest.name}: the manifest has no {e.args[0]} labels") from e
        for kind, names in self._risk.items():
            if sorted(names) != sorted(LABELS):
                raise ModelError(f"{manifest.name}: {kind} risk levels {names} are not {list(LABELS)}")
        known = dict.fromkeys(self._categories["query"] + self._categories["response"])
        self.policy = load_policy(policy, known_categories=list(known))
        files = {role: manifest.file_for(role, quant if role == "model" else None)
                 for role in ("model", "vocab", "embeddings", "heads")}
        manifest.check_sizes(folder, list(files.values()))
        self._closers: list = []
        try:
            self._vocab = self._own(Vocab(folder / files["vocab"], verbose=options.verbose))
            source = self._vocab.meta("tokenizer.chat_template")
            if not source:
                raise ModelError(f"{files['vocab']} carries no chat template")
            self._template = ChatTemplate(source)
            self._im_end = self._vocab.token_id(IM_END)
            try:
                self._table = np.load(folder / files["embeddings"], mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ModelError(f"cannot read the embedding table {files['embeddings']}: {e}") from e
            if self._table.ndim != 2 or self._table.shape[1] != manifest.hidden_size:
                raise ModelError(f"{files['embeddings']} has shape {list(self._table.shape)}, expected "
                                 f"[vocab, {manifest.hidden_size}]")
            self._options = options
            self.device = choose_device(options.device, n_gpu_layers=options.n_gpu_layers)
            self._model_path = folder / files["model"]
            self._max_ctx = options.n_ctx or manifest.context_length
            self._backend = self._own(self._new_backend(min(self._max_ctx, INITIAL_CTX)))
            if self._backend.n_embd != manifest.hidden_size:
                raise ModelError(f"{files['model']} has hidden size {self._backend.n_embd}, "
                                 f"the manifest says {manifest.hidden_size}")
            self._heads = self._own(Heads(folder / files["heads"]))
        except BaseException:
            self.close()
            raise
        self._kv: list[int] = []  # the tokens whose states the backend's cache holds
        self._epoch = 0  # bumped whenever the cache is taken over; sessions compare it
        self._atomic: list[str] | None = None

    def _new_backend(self, n_ctx: int) -> Backend:
        o = self._options
        return Backend(self._model_path, n_ctx=n_ctx, mode="embeddings", n_batch=BATCH,
                       n_threads=o.n_threads, n_gpu_layers=self.device.n_gpu_layers, kv_type=o.kv_type,
                       repack=o.repack, flash_attn=True, verbose=o.verbose)

    def _ensure_context(self, n_tokens: int, what: str) -> None:
        """Make room for ``n_tokens`` cached tokens, growing the context if the model allows."""
        if n_tokens <= self._backend.n_ctx:
            return
        if n_tokens > self._max_ctx:
            raise InputTooLong(
                f"{what} needs {n_tokens} tokens with the template, more than the {self._max_ctx} this "
                "model allows; shorten it, roll back or start a new session (edgeguard never truncates "
                "silently)")
        size = min(self._max_ctx, 1 << (n_tokens - 1).bit_length())
        old, cached = self._backend, list(self._kv)
        new = self._new_backend(size)
        if not new.restore(old.state(), old.n_past) and cached:  # copying the cells is the fast way
            new.eval(embd=self._rows(cached), outputs=())
        self._closers[self._closers.index(old)] = new
        old.close()
        self._backend = new

    def _own(self, resource):
        self._closers.append(resource)
        return resource

    # -- tokens ------------------------------------------------------------------------------
    def _prompt_tokens(self, prompt: str | Sequence) -> tuple[list[int], int]:
        """Tokens up to the start of the response, and the index of the last user turn's end."""
        messages = as_messages(prompt)
        if messages[-1].role != "user":
            raise UsageError("a Stream prompt must end with a user message")
        pieces = self._template.pieces(messages + [Message("assistant", _PROBE)])
        where = max((i for i, (control, text) in enumerate(pieces) if not control and _PROBE in text),
                    default=None)
        if where is None:
            raise ModelError("the chat template drops the response text; cannot find where it starts")
        head = pieces[where][1]
        pieces = pieces[:where] + [(False, head[: head.rindex(_PROBE)])]
        tokens = tokenize_pieces(pieces, self._vocab.tokenize, self._vocab.token_id)
        ends = [i for i, t in enumerate(tokens) if t == self._im_end]
        if not ends:
            raise ModelError(f"the chat template does not close the user turn with {IM_END}")
        return tokens, ends[-1]

    def _rows(self, ids: Sequence[int]) -> np.ndarray:
        index = np.asarray(ids, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self._table.shape[0]):
            bad = next(int(i) for i in index if not 0 <= i < self._table.shape[0])
            raise UsageError(f"token id {bad} is not a token of this model (ids lie in "
                             f"[0, {self._table.shape[0]}))")
        return np.asarray(self._table[index], dtype=np.float32)

    def _evaluate(self, tokens: list[int], at: int) -> np.ndarray:
        """Append ``tokens`` to the cache (reusing the cached common prefix) and return the
        hidden state [1, hidden] of ``tokens[at]``."""
        self._ensure_context(len(tokens), "the conversation")
        keep = min(common_prefix(self._kv, tokens), at)
        if keep < self._backend.n_past:
            self._backend.truncate(keep)
        self._kv = self._kv[:keep]
        hidden = self._backend.eval(embd=self._rows(tokens[keep:]), outputs=(at - keep,))
        self._kv = list(tokens)
        return hidden

    def _take_cache(self) -> int:
        self._epoch += 1
        return self._epoch

    def _atomic_texts(self) -> list[str]:
        if self._atomic is None:
            self._atomic = atomic_texts(self._vocab)
        return self._atomic

    # -- verdicts ----------------------------------------------------------------------------
    def _scores(self, kind: str, risk: np.ndarray, category: np.ndarray):
        scores = dict(zip(self._risk[kind], softmax(risk).tolist()))
        category_scores = dict(zip(self._categories[kind], softmax(category).tolist()))
        return scores, category_scores

    def _prompt_verdict(self, out: dict[str, np.ndarray], timings: dict[str, float]) -> Verdict:
        scores, category_scores = self._scores("query", out["query_risk"][0], out["query_category"][0])
        label = max(scores, key=scores.get)
        category = max(category_scores, key=category_scores.get)
        return Verdict(
            label=label,
            scores=scores,
            categories=() if label == "Safe" else (category,),
            category_scores=category_scores,
            refusal=None,
            flagged=decide(self.policy, label, category_scores),
            policy=self.policy.name,
            engine=self.engine,
            model=self.name,
            timings=timings,
        )

    def check(self, prompt: str | Sequence) -> Verdict:
        """Prompt verdict: the query heads at the ``<|im_end|>`` closing the last user turn.

        Ends any open session (the guard's cache is shared).
        """
        t0 = time.perf_counter()
        tokens, end = self._prompt_tokens(prompt)
        self._take_cache()
        hidden = self._evaluate(tokens[: end + 1], end)
        t1 = time.perf_counter()
        out = self._heads.run(hidden)
        t2 = time.perf_counter()
        return self._prompt_verdict(out, {"prefill_ms": (t1 - t0) * 1e3, "heads_ms": (t2 - t1) * 1e3})

    def session(self, prompt: str | Sequence) -> StreamSession:
        """A streaming session on a response to ``prompt`` (text or a list of messages ending with
        a user turn). Ends any session opened before on this guard."""
        return StreamSession(self, prompt)

    def close(self) -> None:
        self._epoch += 1
        for resource in reversed(getattr(self, "_closers", [])):
            resource.close()
        self._closers = []
        self._table = None

    def __enter__(self) -> StreamGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StreamSession:
    """Scores a response token by token; see ``StreamGuard.session``.

    ``feed(ids)`` scores Qwen3 token ids (all new ones in one forward); ``feed_text(chunk)``
    re-tokenizes text from any source and scores the tokens that became final; ``finish()``
    scores the rest of that text. ``state`` is the debounced verdict (``edgeguard.debounce``),
    ``flagged`` whether it counts under the guard's policy, ``prompt_verdict`` the prompt's.
    """

    def __init__(self, guard: StreamGuard, prompt: str | Sequence):
        self._guard = guard
        self._policy = guard.policy
        t0 = time.perf_counter()
        tokens, end = guard._prompt_tokens(prompt)
        guard._ensure_context(len(tokens) + 1, "the prompt (with room for a response)")
        self._epoch = guard._take_cache()
        hidden = guard._evaluate(tokens, end)
        out = guard._heads.run(hidden)
        t1 = time.perf_counter()
        self.prompt_verdict = guard._prompt_verdict(out, {"prefill_ms": (t1 - t0) * 1e3})
        self._n_prompt = len(tokens)
        self._tokens: list[int] = []
        self._verdicts: list[TokenVerdict] = []
        self._debouncer = Debouncer()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decoder_states: list[tuple[bytes, int]] = []  # before each response token
        self._retokenizer: Retokenizer | None = None

    def _live(self) -> StreamGuard:
        if self._guard is None:
            raise RuntimeFailure("the stream session is closed")
        if self._guard._epoch != self._epoch:
            raise RuntimeFailure("this stream session has ended: a newer session or check on the same "
                                 "guard took over its cache (a guard runs one session at a time)")
        return self._guard

    @property
    def tokens(self) -> tuple[int, ...]:
        """The response tokens fed so far."""
        return tuple(self._tokens)

    @property
    def verdicts(self) -> tuple[TokenVerdict, ...]:
        return tuple(self._verdicts)

    @property
    def state(self) -> StreamState:
        return self._debouncer.state

    @property
    def flagged(self) -> bool:
        """Whether the debounced state is flagged under the policy (Controversial only if strict)."""
        state = self._debouncer.state
        if not state.flagged:
            return False
        return decide(self._policy, state.label, (state.category,) if state.category else ())

    def feed(self, token_ids: Iterable[int]) -> list[TokenVerdict]:
        """Score the next response tokens (Qwen3 ids), all of them in one forward pass."""
        guard = self._live()
        ids = [_token_id(t) for t in token_ids]
        if not ids:
            return []
        rows = guard._rows(ids)
        guard._ensure_context(guard._backend.n_past + len(ids),
                              f"the response ({len(self._tokens)} tokens, {len(ids)} more)")
        backend = guard._backend
        before = backend.n_past
        try:
            hidden = backend.eval(embd=rows, outputs=range(len(ids)))
        except BaseException:
            if backend.n_past > before:  # a backlog over n_batch may have been partly decoded
                backend.truncate(before)
            raise
        guard._kv.extend(ids)
        out = guard._heads.run(hidden)
        risk = softmax(out["response_risk"])
        category = out["response_category"].argmax(axis=-1)
        labels = guard._risk["response"]
        names = guard._categories["response"]
        new = []
        for row, (token, p, c) in enumerate(zip(ids, risk, category)):
            scores = dict(zip(labels, p.tolist()))
            label = labels[int(p.argmax())]
            self._decoder_states.append(self._decoder.getstate())
            text = self._decoder.decode(guard._vocab.piece(token))
            verdict = TokenVerdict(index=len(self._tokens), token=token, text=text, scores=scores,
                                   label=label, category=None if label == "Safe" else names[int(c)])
            self._tokens.append(token)
            self._verdicts.append(verdict)
            self._debouncer.push(label, verdict.category)
            new.append(verdict)
        return new

    def feed_text(self, chunk: str | bytes) -> list[TokenVerdict]:
        """Score text: its Qwen3 tokens are fed once no later text can change them, so the
        verdicts equal ``feed(tokenize(whole text))`` however the text is chunked; ``finish()``
        scores what is still pending at the end."""
        guard = self._live()
        if self._retokenizer is None:
            self._retokenizer = Retokenizer(guard._vocab.tokenize, atomic=guard._atomic_texts())
        return self.feed(self._retokenizer.push(chunk))

    def finish(self) -> list[TokenVerdict]:
        """Score the text still pending in ``feed_text`` (call it when the response has ended)."""
        self._live()
        if self._retokenizer is None:
            return []
        return self.feed(self._retokenizer.finish())

    def rollback(self, n: int) -> StreamState:
        """Forget the last ``n`` response tokens (and any text pending in ``feed_text``); later
        scores equal those of a fresh session fed the remaining tokens."""
        guard = self._live()
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self._tokens):
            raise UsageError(f"cannot roll back {n!r} of {len(self._tokens)} response tokens")
        if n == 0:
            return self.state
        keep = len(self._tokens) - n
        guard._backend.truncate(self._n_prompt + keep)
        del guard._kv[self._n_prompt + keep:]
        del self._tokens[keep:]
        del self._verdicts[keep:]
        self._decoder.setstate(self._decoder_states[keep])
        del self._decoder_states[keep:]
        if self._retokenizer is not None:
            self._retokenizer.reset()
        return self._debouncer.rollback(n)

    def close(self) -> None:
        self._guard = None

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _token_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"token ids must be integers, got {value!r}")
    return int(value)




def atomic_texts(vocab: Vocab) -> list[str]:
    """Texts the tokenizer matches whole even with special-token parsing off (llama.cpp does so
    for user-defined added tokens such as ``<think>``), found without reading token attributes:
    a regular BPE token lies inside one pre-token, so only added tokens can hold a hard pair
    (``edgeguard.retokenize``) and still tokenize to themselves."""
    sep = vocab.token_id(IM_END)
    ids = [i for i in range(vocab.n_vocab) if i != sep]
    stream = np.empty(2 * len(ids), dtype=np.int64)
    stream[0::2] = ids
    stream[1::2] = sep
    parts = vocab.detokenize(stream.tolist()).split(vocab.piece(sep))[:-1]
    if len(parts) != len(ids):  # a token holds the separator's text: go one by one
        parts = [vocab.piece(i) for i in ids]
    found = []
    for token, raw in zip(ids, parts):
        if len(raw) < 2:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.isalpha() or text.isspace() or (text[0] == " " and text[1:].isalpha()):
            continue
        if any(hard_pair(text[k - 1], text[k]) for k in range(1, len(text))) and vocab.tokenize(text) == [token]:
            found.append(text)
    return found
