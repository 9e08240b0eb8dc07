"""Gen engine: Qwen3Guard-Gen verdicts read from next-token probabilities, no generation.

One forward over the rendered conversation + "Safety:" gives the label distribution; short
continuations give the category and (for responses) the refusal. The part of the rendering
before the conversation is the same for every input: its KV cache is computed once (persisted
beside the model), kept in a sequence of its own, and shared by every check. ``check_many``
decodes the variable parts of up to ``batch_size`` conversations in one llama.cpp decode, each
in its own sequence over that shared head.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeguard.engines import inputs as arguments
from edgeguard.engines.core import Defaults, Engine, EngineOptions, EngineStats
from edgeguard.engines.scoring import common_prefix, softmax
from edgeguard.engines.template import ChatTemplate, Message, as_messages, tokenize_pieces
from edgeguard.errors import ModelError, UsageError
from edgeguard.models.manifest import Manifest
from edgeguard.policy import Policy, decide, load_policy
from edgeguard.verdict import LABELS, Verdict

log = logging.getLogger("edgeguard")

JAILBREAK = "Jailbreak"
NONE = "None"
GUESS_LABEL = "Safe"
MODES = ("prompt", "response")
# A prompt check is ~300 template tokens + the text: start with room for that and grow on demand.
# Gen is prefill-bound: llama.cpp's repacked weights do not make its wide calls faster than the
# tiled kernel (a short check 1.02x on a 2-core AMD EPYC, bench/invariance_cost.py; no faster on
# an Intel Xeon either), so the weights stay memory-mapped, in a page cache other processes
# share; flash attention is the attention kind whose result does not depend on the batch.
DEFAULTS = Defaults(kv_type="f16", repack=False, flash_attn=True, initial_ctx=1024)


@dataclass(frozen=True)
class GenOptions(EngineOptions):
    prefix_cache: Path | None = None  # folder for persisted template-head states; None: off
    max_batch: int = 8  # the most conversations one check_many step decodes together


@dataclass
class _Item:
    """One conversation on its way through a batched check."""

    mode: str
    tokens: list[int]  # the rendering, up to (not including) "Safety:"
    seq: int = -1
    t0: float = 0.0


class GenGuard(EngineStats):
    """A loaded Gen model: ``check()`` returns a Verdict, ``check_many()`` a lazy stream of them.

    Thread-safe: concurrent calls are serialised (each waits for the one before it).
    """

    engine = "gen"

    def __init__(self, folder: Path, manifest: Manifest, quant: str, *, policy: Policy | str = "strict",
                 options: GenOptions = GenOptions()):
        if manifest.kind != "gen":
            raise ModelError(f"{manifest.name} is a {manifest.kind} model, not a Gen model")
        if options.max_batch < 1:
            raise UsageError(f"max_batch must be positive, got {options.max_batch}")
        self.name = manifest.name
        self.manifest = manifest
        self.policy = load_policy(policy) if isinstance(policy, str) else policy
        gguf = manifest.file_for("model", quant)
        manifest.check_sizes(folder, [gguf])
        self._model_sha = manifest.files[gguf]["sha256"]
        self.options = options
        # Sequences 0 and 1 hold the two template heads; the rest are work sequences.
        self._engine = Engine(folder / gguf, mode="logits", options=options, defaults=DEFAULTS,
                              max_ctx=manifest.context_length, n_seq=options.max_batch + len(MODES))
        self.device = self._engine.device
        try:
            backend = self._engine.backend
            assert backend is not None  # the engine was just made
            vocab = backend.vocab
            source = vocab.meta("tokenizer.chat_template")
            if not source:
                raise ModelError(f"{gguf} carries no chat template")
            self._template = ChatTemplate(source)
            self._categories = list(manifest.labels["category"])
            self._label_ids = self._first_tokens(LABELS)
            self._refusal_ids = self._first_tokens(manifest.labels.get("refusal", ["Yes", "No"]))
            self._category_ids = self._first_tokens(self._categories + [NONE])
            self._head_seq = {mode: self._engine.acquire() for mode in MODES}
            self._heads = {mode: self._fixed_prefix(mode) for mode in MODES}
        except BaseException:
            self._engine.close()
            raise

    @property
    def vocab(self):
        """The model's tokenizer (``edgeguard.runtime.backend.Vocab``)."""
        return self._engine.backend.vocab

    # -- tokens ------------------------------------------------------------------------------
    def _first_tokens(self, names: Sequence[str]) -> dict[str, int]:
        ids = {name: self.vocab.tokenize(" " + name)[0] for name in names}
        if len(set(ids.values())) != len(ids):
            raise ModelError(f"the first tokens of {list(names)} are not distinct; cannot score them")
        return ids

    def tokens(self, prompt: str | Sequence, response: str | None = None) -> list[int]:
        """The token ids of a conversation's rendering (what ``check`` feeds before "Safety:")."""
        arguments.conversation(prompt, response)
        return self._tokens(as_messages(prompt, response))

    def _tokens(self, messages: Sequence[Message]) -> list[int]:
        return tokenize_pieces(self._template.pieces(messages), self.vocab.tokenize, self.vocab.token_id)

    def _fixed_prefix(self, mode: str) -> list[int]:
        """Tokens every conversation of this mode starts with (two probes' common prefix)."""
        def probe(text):
            msgs = [Message("user", text)] + ([Message("assistant", text)] if mode == "response" else [])
            return self._tokens(msgs)

        a, b = probe("a"), probe("b")
        return a[: common_prefix(a, b)]

    def _continue(self, tokens: list[int], text: str) -> list[int]:
        return tokens + self.vocab.tokenize(text)

    # -- the shared template heads -------------------------------------------------------------
    def _prefix_file(self, tokens: list[int]) -> Path | None:
        folder = self.options.prefix_cache
        if folder is None:
            return None
        key = hashlib.sha256(self._model_sha.encode() + np.asarray(tokens, np.int32).tobytes()).hexdigest()[:24]
        return Path(folder) / f"prefix-{key}.kv"

    def _ensure_head(self, mode: str) -> None:
        """The head sequence of ``mode`` holds its template head: from disk, or computed (and saved)."""
        seq, tokens = self._head_seq[mode], self._heads[mode]
        engine = self._engine
        if engine.held(seq) == tokens:
            return
        engine.truncate(seq, 0)
        engine.ensure_room(len(tokens), "the template")
        path = self._prefix_file(tokens)
        backend = engine.backend
        assert backend is not None  # the engine is open: ensure_room just used it
        if path is not None and backend.load_prefix(path, seq) and backend.n_past[seq] == len(tokens):
            engine.held(seq).extend(tokens)
            return
        engine.truncate(seq, 0)
        engine.decode({seq: (tokens, tokens)}, {seq: ()}, "the template")
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                backend.save_prefix(path, seq)
            except OSError as e:
                log.warning("could not persist the prefix cache at %s: %s", path, e)

    # -- scoring ---------------------------------------------------------------------------------
    def _read(self, logits: np.ndarray, ids: dict[str, int]) -> dict[str, float]:
        probs = softmax(logits[list(ids.values())])
        return dict(zip(ids, probs.tolist()))

    def _start(self, items: list[_Item]) -> None:
        """Give each item a work sequence that starts with its mode's shared head."""
        engine = self._engine
        for mode in {i.mode for i in items}:
            self._ensure_head(mode)
        # Room for every variable part and its longest read-out, so nothing grows mid-batch
        # (growing copies each sequence separately, which would unshare the heads).
        margin = 32
        engine.ensure_room(sum(len(i.tokens) - self._shared(i) + margin for i in items), "the conversations")
        for item in items:
            item.seq = engine.acquire()
            engine.share(self._head_seq[item.mode], item.seq, self._shared(item))

    def _shared(self, item: _Item) -> int:
        head = self._heads[item.mode]
        return len(head) if item.tokens[: len(head)] == head else 0

    def _extend(self, wanted: dict[int, list[int]], *, wide: bool = True) -> dict[int, np.ndarray]:
        """Decode each sequence up to its wanted tokens (from where they part) in one batch; the
        logits after the last token of each. ``wide``: the kind of llama.cpp call
        (``edgeguard.runtime.decode_shapes``); narrow calls of a few tokens skip the many-token
        kernels' fixed cost."""
        engine = self._engine
        inputs = {}
        for seq, tokens in wanted.items():
            keep = min(common_prefix(engine.held(seq), tokens), len(tokens) - 1)
            engine.truncate(seq, keep)
            inputs[seq] = (tokens[keep:], tokens[keep:])
        return {seq: out[0] for seq, out in engine.decode(inputs, {s: (-1,) for s in inputs}, wide=wide).items()}

    def _reread(self, wanted: dict[int, list[int]], speculated: set[int]) -> dict[int, np.ndarray]:
        """``_extend`` for read-outs: a read-out a lone check would have speculated (its tokens
        decoded in the wide label call) in a wide call, any other in narrow ones, so each
        conversation's read-out takes the same kernels alone and in a batch (batch invariance)
        and a wrong guess costs a few-token call instead of a padded wide one (the 0.6B on a
        2-core Intel Xeon: 74-77 against 106-126 ms, docs/performance.md)."""
        out = {}
        for wide in (True, False):
            part = {seq: tokens for seq, tokens in wanted.items() if (seq in speculated) == wide}
            if part:
                out.update(self._extend(part, wide=wide))
        return out

    def _judge(self, items: list[_Item]) -> list[Verdict]:
        engine = self._engine
        self._start(items)
        t1 = time.perf_counter()
        # One decode reads each label and, speculating on the most common verdict (Safe, no
        # category), the category and refusal too; a wrong guess costs one short decode more.
        # Only a lone conversation speculates: taking a wrong guess back leaves a gap in the cache
        # that llama.cpp refills first, which in a batch could put one conversation's next tokens
        # before its earlier ones and change its numbers (docs/performance.md, batch invariance).
        speculate = len(items) == 1
        inputs, outputs, labelled = {}, {}, {}
        for item in items:
            labelled[item.seq] = self._continue(item.tokens, "Safety:")
            guess = self._continue(labelled[item.seq], f" {GUESS_LABEL}\nCategories:")
            at = [len(labelled[item.seq]) - 1, len(guess) - 1]
            if not speculate:
                guess, at = labelled[item.seq], at[:1]
            elif item.mode == "response":
                guess = self._continue(guess, f" {NONE}\nRefusal:")
                at.append(len(guess) - 1)
            new = guess[len(engine.held(item.seq)):]
            inputs[item.seq] = (new, new)
            outputs[item.seq] = [a - len(engine.held(item.seq)) for a in at]
        logits = engine.decode(inputs, outputs)
        labels = {}
        for item in items:
            scores = self._read(logits[item.seq][0], self._label_ids)
            labels[item.seq] = (max(scores, key=lambda k: scores[k]), scores)
        t2 = time.perf_counter()
        misses = {i.seq: self._continue(labelled[i.seq], f" {labels[i.seq][0]}\nCategories:")
                  for i in items if labels[i.seq][0] != GUESS_LABEL or not speculate}
        category_logits = {i.seq: logits[i.seq][1] for i in items if i.seq not in misses}
        category_logits.update(self._reread(misses, {s for s in misses if labels[s][0] == GUESS_LABEL}))
        categories = {}
        for item in items:
            names = [c for c in self._categories if item.mode == "prompt" or c != JAILBREAK] + [NONE]
            scores = self._read(category_logits[item.seq], {n: self._category_ids[n] for n in names})
            categories[item.seq] = (max(scores, key=lambda k: scores[k]), scores)
        refusals = {}
        responses = [i for i in items if i.mode == "response"]
        if responses:
            guessed = {i.seq for i in responses
                       if speculate and labels[i.seq][0] == GUESS_LABEL and categories[i.seq][0] == NONE}
            reread = {i.seq: self._continue(self._continue(labelled[i.seq], f" {labels[i.seq][0]}\nCategories:"),
                                            f" {categories[i.seq][0]}\nRefusal:")
                      for i in responses if i.seq not in guessed}
            refusal_logits = {s: logits[s][2] for s in guessed}
            refusal_logits.update(self._reread(reread, {s for s in reread if labels[s][0] == GUESS_LABEL
                                                        and categories[s][0] == NONE}))
            for item in responses:
                scores = self._read(refusal_logits[item.seq], self._refusal_ids)
                refusals[item.seq] = max(scores, key=lambda k: scores[k])
        t3 = time.perf_counter()
        verdicts = []
        for item in items:
            label, scores = labels[item.seq]
            category, category_scores = categories[item.seq]
            verdicts.append(Verdict(
                label=label,
                scores=scores,
                categories=() if category == NONE else (category,),
                category_scores=category_scores,
                refusal=refusals.get(item.seq),
                flagged=decide(self.policy, label, category_scores),
                policy=self.policy.name,
                engine=self.engine,
                model=self.name,
                timings={"prefix_ms": (t1 - item.t0) * 1e3, "label_ms": (t2 - t1) * 1e3,
                         "readout_ms": (t3 - t2) * 1e3, "batch": len(items)},
            ))
        return verdicts

    def _item(self, prompt, response=None) -> _Item:
        t0 = time.perf_counter()
        arguments.conversation(prompt, response)
        messages = as_messages(prompt, response)
        mode = "response" if messages[-1].role == "assistant" else "prompt"
        return _Item(mode, self._tokens(messages), t0=t0)

    def _run(self, raw: list) -> list[Verdict]:
        """Verdicts for a list of ``check`` argument tuples, under the engine's lock (the
        tokenizer belongs to the backend too)."""
        with self._engine.lock:
            if self._engine.backend is None:
                raise UsageError("the guard is closed")
            items = [self._item(*args) for args in raw]
            try:
                return self._judge(items)
            finally:
                for item in items:
                    if item.seq >= 0:
                        self._engine.release(item.seq)

    def check(self, prompt: str | Sequence, response: str | None = None) -> Verdict:
        """Verdict on a prompt, a prompt+response, or a list of {role, content} messages."""
        return self._run([(prompt, response)])[0]

    def check_many(self, items: Iterable, batch_size: int | None = None) -> Iterator[Verdict]:
        """Lazy verdicts for prompts, (prompt, response) pairs or message lists, in order.

        Up to ``batch_size`` conversations are decoded together; the verdicts equal ``check``'s
        within float rounding (scores within 1e-3 on F16 weights). Default: ``max_batch`` on a
        GPU, 1 on a CPU, where a Gen check is already compute-bound (~100 new tokens a decode)
        and batching is slower (bench/batch_bench.py) because every token then attends over all
        sequences' cells.
        """
        default = self.options.max_batch if self.device.device == "gpu" else 1
        size = default if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= self.options.max_batch:
            raise UsageError(f"batch_size must lie in [1, {self.options.max_batch}] (max_batch), got {size!r}")
        iterator = iter(items)
        while True:
            chunk = list(itertools.islice(iterator, size))
            if not chunk:
                return
            yield from self._run([x if isinstance(x, tuple) else (x,) for x in chunk])

    def generate(self, prompt: str | Sequence, response: str | None = None, max_new_tokens: int = 128) -> str:
        """The official way: greedy decoding of the verdict text (for comparison and debugging)."""
        out: list[int] = []
        with self._engine.lock:
            item = self._item(prompt, response)
            vocab = self.vocab
            stop = {vocab.token_id("<|im_end|>"), vocab.token_id("<|endoftext|>")}
            try:
                self._start([item])
                tokens = list(item.tokens)
                logits = self._extend({item.seq: tokens})[item.seq]
                for _ in range(max_new_tokens):
                    nxt = int(np.argmax(logits))
                    if nxt in stop:
                        break
                    out.append(nxt)
                    tokens.append(nxt)
                    logits = self._extend({item.seq: tokens})[item.seq]
            finally:
                if item.seq >= 0:
                    self._engine.release(item.seq)
        return vocab.detokenize(out).decode("utf-8", errors="replace")

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> GenGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
