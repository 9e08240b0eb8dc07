"""Stream engine: Qwen3Guard-Stream verdicts on a prompt and on every token of a response.

The backbone GGUF (a dummy 8-token vocabulary) runs in llama.cpp on rows of the real embedding
table, read row by row from its file (``embedding_rows``); the two classification heads run in onnxruntime.
One guard hosts many live sessions, each in its own llama.cpp sequence: ``feed`` appends a
session's new tokens in ONE decode whatever their number, and ``guard.feed_many`` decodes the
new tokens of several sessions together, one decode for all of them.
"""

from __future__ import annotations

import codecs
import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeguard.engines import inputs as arguments
from edgeguard.engines.core import Defaults, Engine, EngineOptions, EngineStats
from edgeguard.engines.debounce import PAIR_LABELS, Debouncer
from edgeguard.engines.retokenize import Retokenizer, hard_pair
from edgeguard.engines.scoring import softmax
from edgeguard.engines.template import ChatTemplate, Message, as_messages, tokenize_pieces
from edgeguard.errors import ModelError, RuntimeFailure, UsageError
from edgeguard.models.manifest import Manifest
from edgeguard.policy import Policy, can_flag, decide, load_policy
from edgeguard.runtime.backend import Vocab
from edgeguard.runtime.embedding_rows import EmbeddingRows
from edgeguard.runtime.heads import Heads
from edgeguard.verdict import LABELS, StreamState, TokenVerdict, Verdict

IM_END = "<|im_end|>"
# Where the response starts: the rendering of a probe assistant message is cut at its content.
_PROBE = "\ue000edgeguard-response\ue001"
# Per-token speed is what Stream is for. On the CPU the KV cache holds its keys in q8_0 and its
# values in f16: a step reads half the key bytes (one session on a 2-core Intel Xeon: 0.70x the
# time of f16 keys at 7,000 cached tokens, 0.93x at 100; the cache 0.77x the memory), and
# llama.cpp's flash attention takes its per-query kernel for keys and values of different
# types, so scores stay batch-invariant; the scores move ~2x as far from the PyTorch oracle as
# with f16 keys (2.5e-3 against 1.1e-3 on the tiny random fixture, tests/test_stream.py). A
# model whose head size q8_0's blocks of 32 do not divide, and a GPU, take f16. A q8_0 cache
# (quantized values too) saves more memory but makes a step slower than f16
# (docs/long-inputs.md). llama.cpp's repacked weights are on (a step ~25%
# faster on an Intel Xeon, ~1% on an AMD EPYC; ``decode_shapes`` keeps their 4-token kernel off
# streamed tokens); flash attention is on, one setting for the guard's life, so no session's
# scores depend on others (``kernels.choose_flash_attn``).
# The KV cache is allocated up front (~112 KiB per token for
# the real model at f16): it starts at 512 positions and grows on demand up to the manifest's
# context length.
# runtime_mb: a Stream process's memory besides weights and KV cache (onnxruntime and its heads,
# repacked-weight and compute buffers, Python, a growth's transient); 300 MB covers the ~240 MB
# measured for the 0.6B model fed to 7,000 tokens, with room for the growth's transient
# (bench/long_bench.py's stream_edgeguard worker; docs/long-inputs.md).
DEFAULTS = Defaults(kv_type="q8_0-keys", repack=True, flash_attn=None, initial_ctx=512, runtime_mb=300)


@dataclass(frozen=True)
class StreamOptions(EngineOptions):
    max_sessions: int = 16  # live sessions one guard hosts (each is a llama.cpp sequence)


class StreamGuard(EngineStats):
    """A loaded Stream model: ``check``, ``check_many``, ``session`` and ``feed_many``.

    Thread-safe: concurrent calls are serialised. Sessions are independent: one session's
    feed, rollback, finish or error never changes another's verdicts.
    """

    engine = "stream"

    def __init__(self, folder: Path, manifest: Manifest, quant: str, *, policy: Policy | str = "strict",
                 options: StreamOptions = StreamOptions()):
        if manifest.kind != "stream":
            raise ModelError(f"{manifest.name} is a {manifest.kind} model, not a Stream model")
        if options.max_sessions < 1:
            raise UsageError(f"max_sessions must be positive, got {options.max_sessions}")
        folder = Path(folder)
        self.name = manifest.name
        self.manifest = manifest
        self.options = options
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
            self.vocab = self._own(Vocab(folder / files["vocab"], verbose=options.verbose))
            source = self.vocab.meta("tokenizer.chat_template")
            if not source:
                raise ModelError(f"{files['vocab']} carries no chat template")
            self._template = ChatTemplate(source)
            self._im_end = self.vocab.token_id(IM_END)
            self._table = self._own(EmbeddingRows(folder / files["embeddings"]))
            if self._table.shape[1] != manifest.hidden_size:  # (EmbeddingRows checks it is 2-D)
                raise ModelError(f"{files['embeddings']} has shape {list(self._table.shape)}, expected "
                                 f"[vocab, {manifest.hidden_size}]")
            self._engine = self._own(Engine(folder / files["model"], mode="embeddings", options=options,
                                            defaults=DEFAULTS, max_ctx=manifest.context_length,
                                            n_seq=options.max_sessions, ordered_cells=True))
            backend = self._engine.backend
            assert backend is not None  # the engine was just made
            if backend.n_embd != manifest.hidden_size:
                raise ModelError(f"{files['model']} has hidden size {backend.n_embd}, "
                                 f"the manifest says {manifest.hidden_size}")
            if self._table.shape[0] < self.vocab.n_vocab:
                raise ModelError(f"{files['embeddings']} has {self._table.shape[0]} rows for a vocabulary of "
                                 f"{self.vocab.n_vocab} tokens")
            self.device = self._engine.device
            self._heads = self._own(Heads(folder / files["heads"]))
            widths = {"response_risk": len(self._risk["response"]), "query_risk": len(self._risk["query"]),
                      "response_category": len(self._categories["response"]),
                      "query_category": len(self._categories["query"])}
            self._heads.expect(manifest.hidden_size, widths)
        except BaseException:
            self.close()
            raise
        self._atomic: list[str] | None = None
        self._sessions: set[StreamSession] = set()

    def _own(self, resource):
        self._closers.append(resource)
        return resource

    @property
    def live_sessions(self) -> int:
        return len(self._sessions)

    @property
    def pair_labels(self) -> frozenset[str]:
        """The labels with which a response token may start a pair this guard's policy flags
        (the debounce: two consecutive tokens of one label, the pair's category that of the
        second): a token with another label is never part of a flagged pair's start."""
        return frozenset(label for label in PAIR_LABELS
                         if can_flag(self.policy, label, self._categories["response"]))

    @property
    def call_tokens(self) -> int | None:
        """The most streamed tokens one llama.cpp call decodes (``decode_shapes``: a feed of more
        takes more calls, each costing the weights' read again); None where calls are not capped
        (the GPU)."""
        backend = self._live_engine().backend
        assert backend is not None  # _live_engine checks it
        return backend.shape_rules.narrow_max if backend.shaped else None

    def _live_engine(self) -> Engine:
        if self._engine is None or self._engine.backend is None:
            raise RuntimeFailure("the guard is closed")
        return self._engine

    # -- tokens ------------------------------------------------------------------------------
    def prompt_tokens(self, prompt: str | Sequence) -> tuple[list[int], int]:
        """Tokens up to the start of the response, and the index of the last user turn's end."""
        arguments.conversation(prompt)
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
        tokens = tokenize_pieces(pieces, self.vocab.tokenize, self.vocab.token_id)
        ends = [i for i, t in enumerate(tokens) if t == self._im_end]
        if not ends:
            raise ModelError(f"the chat template does not close the user turn with {IM_END}")
        return tokens, ends[-1]

    def response_tokens(self, text: str) -> list[int]:
        """The Qwen3 token ids of a response text (special-token parsing off)."""
        return self.vocab.tokenize(arguments.text(text, "response"))

    def _rows(self, ids: Sequence[int]) -> np.ndarray:
        return self._table.rows(ids)

    def _ids(self, token_ids: Iterable[int]) -> list[int]:
        """Validated Qwen3 token ids (a clear UsageError for anything else)."""
        n = self._table.shape[0]
        ids = []
        for value in token_ids:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise UsageError(f"token ids must be integers, got {value!r}")
            if not 0 <= int(value) < n:
                raise UsageError(f"token id {value} is not a token of this model (ids lie in [0, {n}))")
            ids.append(int(value))
        return ids

    def _atomic_texts(self) -> list[str]:
        if self._atomic is None:
            self._atomic = atomic_texts(self.vocab)
        return self._atomic

    # -- verdicts ----------------------------------------------------------------------------
    def _scores(self, kind: str, risk: np.ndarray, category: np.ndarray):
        scores = dict(zip(self._risk[kind], softmax(risk).tolist()))
        category_scores = dict(zip(self._categories[kind], softmax(category).tolist()))
        return scores, category_scores

    def _prompt_verdict(self, out: dict[str, np.ndarray], row: int, timings: dict[str, float]) -> Verdict:
        scores, category_scores = self._scores("query", out["query_risk"][row], out["query_category"][row])
        label = max(scores, key=lambda k: scores[k])
        category = max(category_scores, key=lambda k: category_scores[k])
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

    def _open(self, prompts: Sequence, sessions: Sequence[StreamSession]) -> list[Verdict]:
        """Prefill each prompt into its session's sequence, all in one decode; prompt verdicts."""
        engine = self._live_engine()
        t0 = time.perf_counter()
        rendered = [self.prompt_tokens(p) for p in prompts]
        inputs = {}
        seqs: list[int] = []
        for s, (tokens, _) in zip(sessions, rendered):
            s._seq = seq = engine.acquire("session")
            seqs.append(seq)
            self._sessions.add(s)
            s._n_prompt = len(tokens)
            inputs[seq] = (tokens, self._rows(tokens))
        hidden = engine.decode(inputs, {seq: (end,) for seq, (_, end) in zip(seqs, rendered)}, "the prompt")
        t1 = time.perf_counter()
        out = self._heads.run(np.concatenate([hidden[seq] for seq in seqs]))
        t2 = time.perf_counter()
        timings = {"prefill_ms": (t1 - t0) * 1e3, "heads_ms": (t2 - t1) * 1e3}
        return [self._prompt_verdict(out, i, timings) for i in range(len(sessions))]

    def session(self, prompt: str | Sequence) -> StreamSession:
        """A streaming session on a response to ``prompt`` (text or a list of messages ending with
        a user turn). Close it (or use it as a context manager) to free its cache."""
        session = StreamSession(self)
        with self._engine.lock:
            try:
                session.prompt_verdict = self._open([prompt], [session])[0]
            except BaseException:
                session.close()
                raise
        return session

    def feed_many(self, feeds: Mapping[StreamSession, Iterable[int]]) -> dict[StreamSession, list[TokenVerdict]]:
        """Score new tokens of several sessions in one decode: ``{session: [TokenVerdict, ...]}``.

        Each session's verdicts equal what it gets fed alone (within float rounding). Bad input
        for any session raises before anything is decoded, so no session changes.
        """
        with self._live_engine().lock:
            engine = self._live_engine()
            ids = {}
            seqs: dict[StreamSession, int] = {}
            for session, tokens in feeds.items():
                if not isinstance(session, StreamSession) or session._guard is not self:
                    raise UsageError("feed_many takes sessions of this guard")
                session._live()
                seq = session._seq
                assert seq is not None  # session._live() raises for a session without one
                if len(engine.held(seq)) != session._n_prompt + len(session._tokens):
                    raise RuntimeFailure("this session's cache was lost (the context could not be moved "
                                         "when it grew); open a new session")
                ids[session] = self._ids(tokens)
                seqs[session] = seq
            ids = {s: t for s, t in ids.items() if t}
            if not ids:
                return {s: [] for s in feeds}
            what = "the response" if len(ids) == 1 else f"the responses of {len(ids)} sessions"
            hidden = engine.decode({seqs[s]: (t, self._rows(t)) for s, t in ids.items()},
                                   {seqs[s]: range(len(t)) for s, t in ids.items()}, what, wide=False)
            t0 = time.perf_counter()
            out = self._heads.run(np.concatenate([hidden[seqs[s]] for s in ids]))
            engine.timings.heads_ms += (time.perf_counter() - t0) * 1e3
            result: dict[StreamSession, list[TokenVerdict]] = {s: [] for s in feeds}
            offset = 0
            for session, tokens in ids.items():
                rows = slice(offset, offset + len(tokens))
                offset += len(tokens)
                result[session] = session._record(tokens, out["response_risk"][rows],
                                                  out["response_category"][rows])
            return result

    def check(self, prompt: str | Sequence, response: str | Sequence[int] | None = None) -> Verdict:
        """Prompt verdict (the query heads at the ``<|im_end|>`` closing the last user turn), or
        with ``response`` (text or token ids) the response judged token by token: the final
        debounced verdict, with ``flagged_at``."""
        return next(self.check_many([(prompt, response)], batch_size=1))

    def check_many(self, items: Iterable, batch_size: int | None = None):
        """Lazy verdicts for prompts or (prompt, response) pairs, in order; up to ``batch_size``
        (default ``max_sessions``) conversations are decoded together."""
        size = self.options.max_sessions if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= self.options.max_sessions:
            raise UsageError(f"batch_size must lie in [1, {self.options.max_sessions}] (max_sessions), "
                             f"got {size!r}")
        iterator = iter(items)
        while True:
            chunk = [(x[0], x[1] if len(x) > 1 else None) if isinstance(x, tuple) else (x, None)
                     for x in itertools.islice(iterator, size)]
            if not chunk:
                return
            yield from self._check_chunk(chunk)

    def _check_chunk(self, chunk: list[tuple]) -> list[Verdict]:
        with self._live_engine().lock:
            sessions = [StreamSession(self) for _ in chunk]
            try:
                prompt_verdicts = self._open([p for p, _ in chunk], sessions)
                feeds = {}
                for s, (_, response) in zip(sessions, chunk):
                    if response is not None:
                        feeds[s] = self.response_tokens(response) if isinstance(response, str) else \
                            arguments.token_ids(response, self.vocab.n_vocab)
                if feeds:
                    self.feed_many(feeds)
                return [v if response is None else s._response_verdict(v)
                        for s, v, (_, response) in zip(sessions, prompt_verdicts, chunk)]
            finally:
                for s in sessions:
                    s.close()

    def _release(self, session: StreamSession) -> None:
        with self._engine.lock:
            self._sessions.discard(session)
            if session._seq is not None and self._engine.backend is not None:
                self._engine.release(session._seq)

    def close(self) -> None:
        for session in list(getattr(self, "_sessions", ())):
            session._guard = None
        self._sessions = set()
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
    re-tokenizes text from any source and scores the tokens that became final (invalid UTF-8 is
    a UsageError, as in the CLI); ``finish()`` scores the rest of that text. ``state`` is the
    debounced verdict (``edgeguard.engines.debounce``), ``flagged`` whether it counts under the guard's
    policy, ``prompt_verdict`` the prompt's.
    """

    def __init__(self, guard: StreamGuard):
        self._guard: StreamGuard | None = guard
        self._policy = guard.policy
        self._seq: int | None = None
        self._n_prompt = 0
        self.prompt_verdict: Verdict | None = None
        self._tokens: list[int] = []
        self._verdicts: list[TokenVerdict] = []
        self._debouncer = Debouncer()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decoder_states: list[tuple[bytes, int]] = []  # before each response token
        self._retokenizer: Retokenizer | None = None

    def _live(self) -> StreamGuard:
        if self._guard is None or self._seq is None:
            raise RuntimeFailure("the stream session is closed")
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

    def _record(self, tokens: list[int], risk_logits: np.ndarray, category_logits: np.ndarray) -> list[TokenVerdict]:
        guard = self._guard
        assert guard is not None  # only feed_many calls this, for sessions that _live() accepted
        risk = softmax(risk_logits)
        category = category_logits.argmax(axis=-1)
        labels = guard._risk["response"]
        names = guard._categories["response"]
        new = []
        for token, p, c in zip(tokens, risk, category):
            scores = dict(zip(labels, p.tolist()))
            label = labels[int(p.argmax())]
            self._decoder_states.append(self._decoder.getstate())
            text = self._decoder.decode(guard.vocab.piece(token))
            verdict = TokenVerdict(index=len(self._tokens), token=token, text=text, scores=scores,
                                   label=label, category=None if label == "Safe" else names[int(c)])
            self._tokens.append(token)
            self._verdicts.append(verdict)
            self._debouncer.push(label, verdict.category)
            new.append(verdict)
        return new

    def _response_verdict(self, prompt_verdict: Verdict) -> Verdict:
        """The debounced verdict on the whole response, as a Verdict with ``flagged_at``; its
        scores are those of the triggering token (else of the last token)."""
        state = self.state
        at = state.flagged_at if state.flagged_at is not None else len(self._verdicts) - 1
        scores = self._verdicts[at].scores if self._verdicts else prompt_verdict.scores
        return Verdict(
            label=state.label,
            scores=scores,
            categories=(state.category,) if state.category else (),
            category_scores={},
            refusal=None,
            flagged=self.flagged,
            policy=self._policy.name,
            engine="stream",
            model=prompt_verdict.model,
            timings=prompt_verdict.timings,
            flagged_at=state.flagged_at,
            response_tokens=len(self._tokens),
        )

    def feed(self, token_ids: Iterable[int]) -> list[TokenVerdict]:
        """Score the next response tokens (Qwen3 ids), all of them in one forward pass."""
        return self._live().feed_many({self: arguments.token_ids(token_ids, self._live().vocab.n_vocab)})[self]

    def feed_text(self, chunk: str | bytes) -> list[TokenVerdict]:
        """Score text: its Qwen3 tokens are fed once no later text can change them, so the
        verdicts equal ``feed(tokenize(whole text))`` however the text is chunked; ``finish()``
        scores what is still pending at the end."""
        guard = self._live()
        if self._retokenizer is None:
            self._retokenizer = Retokenizer(guard.vocab.tokenize, atomic=guard._atomic_texts())
        return self.feed(self._retokenizer.push(arguments.chunk(chunk)))

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
        seq = self._seq
        assert seq is not None  # _live() above raises for a session without one
        with guard._engine.lock:
            guard._engine.truncate(seq, self._n_prompt + keep)
        del self._tokens[keep:]
        del self._verdicts[keep:]
        self._decoder.setstate(self._decoder_states[keep])
        del self._decoder_states[keep:]
        if self._retokenizer is not None:
            self._retokenizer.reset()
        return self._debouncer.rollback(n)

    def close(self) -> None:
        """Free this session's cache (its verdicts stay readable)."""
        if self._guard is not None:
            self._guard._release(self)
        self._guard = None
        self._seq = None

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def atomic_texts(vocab: Vocab) -> list[str]:
    """Texts the tokenizer matches whole even with special-token parsing off (llama.cpp does so
    for user-defined added tokens such as ``<think>``), found without reading token attributes:
    a regular BPE token lies inside one pre-token, so only added tokens can hold a hard pair
    (``edgeguard.engines.retokenize``) and still tokenize to themselves."""
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
