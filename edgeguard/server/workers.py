"""One worker thread per engine: the event loop never blocks on llama.cpp.

Requests become jobs on the worker's queue; the worker takes everything pending at each step
and runs it in as few decodes as the engine allows: Gen checks go through ``check_many`` (up to
``max_batch`` conversations in one decode), the new tokens of all live streams through one
``StreamGuard.feed_many``. Results come back to the event loop as futures. A job that fails
fails alone: a batch that raises is rerun job by job, so one bad request never poisons another,
and a stream's frames that arrive together are judged as if they had come one by one. A job
whose client has left (its future cancelled) is skipped, and a long one stops between decodes.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeguard.engines import inputs
from edgeguard.engines.retokenize import Retokenizer
from edgeguard.errors import UsageError

log = logging.getLogger("edgeguard")


class QueueFull(Exception):
    """The worker has ``max_queue`` items waiting: the client should retry later (503)."""


@dataclass
class Job:
    kind: str  # "check" | "open" | "feed" | "rollback" | "close"
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    items: list = field(default_factory=list)  # check: argument tuples; open: [prompt]
    stream: LiveStream | None = None
    text: str | None = None
    ids: list | None = None
    final: bool = False
    n: int = 0
    # Called on the event loop with the result when nobody waits for it any more (an opened
    # stream whose client left must still be closed).
    orphaned: Callable[[Any], None] | None = None

    @property
    def size(self) -> int:
        return max(1, len(self.items))

    @property
    def cancelled(self) -> bool:
        """Whether the client left (its handler cancelled the wait). Read from the worker thread:
        a stale answer only runs or skips one job a step late."""
        return self.future.cancelled()

    def resolve(self, value: Any) -> None:
        self.loop.call_soon_threadsafe(_settle, self, value, None)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self, None, error)


def _settle(job: Job, value: Any, error: BaseException | None) -> None:
    if job.future.done():  # the client went away and its handler cancelled the wait
        if error is None and job.orphaned is not None:
            job.orphaned(value)
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(value)


class _Worker:
    """A thread that runs the jobs of one guard; subclasses say how a step runs."""

    def __init__(self, guard, *, max_queue: int, on_cancel: Callable[[int], None] = lambda n: None):
        self.guard = guard
        self.max_queue = max_queue
        self._on_cancel = on_cancel  # told how many items were dropped because their client left
        self._jobs: collections.deque[Job] = collections.deque()
        self._waiting = 0  # items queued, not yet taken by the worker
        self._busy = 0  # items the worker is running now
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"edgeguard-{guard.engine}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting or running."""
        return self._waiting + self._busy

    def submit(self, kind: str, *, bounded: bool = True, **fields) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = Job(kind, loop, loop.create_future(), **fields)
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if bounded and self._waiting and self._waiting + job.size > self.max_queue:
                raise QueueFull(f"{self._waiting} items are waiting for the {self.guard.engine} engine")
            self._jobs.append(job)
            self._waiting += job.size
            self._cv.notify()
        return job.future

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closing:
                    self._cv.wait()
                if not self._jobs:
                    return
                self._gather()
                jobs = self._take()
                taken = sum(j.size for j in jobs)
                self._waiting -= taken
                self._busy = taken
            jobs = self._live(jobs)
            try:
                if jobs:
                    self._step(jobs)
            except BaseException as e:  # a bug in a step: every job of it learns, the worker lives
                log.exception("worker step failed")
                for job in jobs:
                    job.fail(e)
            finally:
                self._busy = 0

    def _live(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose client still waits; a close always runs (it frees a session)."""
        live, dropped = [], 0
        for job in jobs:
            if job.cancelled and job.kind != "close":
                dropped += job.size
            else:
                live.append(job)
        if dropped:
            self._on_cancel(dropped)
        return live

    def _gather(self) -> None:
        """Called with the lock held and a job queued: may wait a little for more to batch."""

    def _take(self) -> list[Job]:
        jobs = list(self._jobs)
        self._jobs.clear()
        return jobs

    def _step(self, jobs: list[Job]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()


class GenWorker(_Worker):
    """Batches concurrent checks: each step decodes up to ``max_batch`` conversations."""

    def __init__(self, guard, *, max_queue: int, max_batch: int, on_cancel: Callable[[int], None] = lambda n: None):
        self.max_batch = max_batch
        super().__init__(guard, max_queue=max_queue, on_cancel=on_cancel)

    def _take(self) -> list[Job]:
        jobs = [self._jobs.popleft()]
        count = jobs[0].size
        while self._jobs and count + self._jobs[0].size <= self.max_batch:
            count += self._jobs[0].size
            jobs.append(self._jobs.popleft())
        return jobs

    def _step(self, jobs: list[Job]) -> None:
        if len(jobs) == 1:
            self._run_alone(jobs[0])
            return
        # Several jobs are taken together only when all their items fit one decode.
        items = [args for job in jobs for args in job.items]
        try:
            verdicts = list(self.guard.check_many(items, batch_size=len(items)))
        except Exception:
            for job in jobs:  # find the job that failed; the others still get their verdicts
                self._run_alone(job)
            return
        at = 0
        for job in jobs:
            job.resolve(verdicts[at: at + len(job.items)])
            at += len(job.items)

    def _run_alone(self, job: Job) -> None:
        """One job, ``max_batch`` items a decode; it stops between decodes once its client left."""
        verdicts: list = []
        try:
            for at in range(0, len(job.items), self.max_batch):
                if job.cancelled:
                    self._on_cancel(len(job.items) - at)
                    return
                chunk = job.items[at: at + self.max_batch]
                verdicts += self.guard.check_many(chunk, batch_size=len(chunk))
        except Exception as e:
            job.fail(e)
            return
        job.resolve(verdicts)


class LiveStream:
    """A WebSocket stream's server-side state: its session and its text retokenizer."""

    def __init__(self, session, retokenizer: Retokenizer):
        self.session = session
        self.retokenizer = retokenizer
        self.mode: str | None = None  # "text" or "tokens": a stream takes one of them

    def save(self) -> tuple:
        """What ``ids_for`` changes, to put back when the frame's feed fails. The server pushes
        str chunks only, so the retokenizer's UTF-8 decoder never holds bytes and a shallow copy
        (its pending text) is all of its state."""
        return self.mode, copy.copy(self.retokenizer)

    def restore(self, saved: tuple) -> None:
        self.mode, self.retokenizer = saved

    def ids_for(self, job: Job, n_vocab: int) -> list[int]:
        """The token ids a feed job brings (text goes through the retokenizer); checked before
        anything changes, so a bad frame leaves the stream as it was."""
        mode = "text" if job.text is not None else "tokens" if job.ids is not None else self.mode
        if mode is not None and self.mode not in (None, mode):
            raise UsageError(f"this stream takes {self.mode}; send either text or tokens, not both")
        ids = inputs.token_ids(job.ids, n_vocab) if job.ids is not None else []
        if job.text is not None:
            ids = self.retokenizer.push(inputs.chunk(job.text))
        if job.final:
            ids += self.retokenizer.finish()
        self.mode = mode
        return ids

    def report(self, verdicts: list, *, with_state: bool = True) -> dict[str, Any]:
        session = self.session
        if not with_state:
            return {"verdicts": verdicts, "state": None}
        return {"verdicts": verdicts, "state": session.state, "flagged": session.flagged,
                "prompt": session.prompt_verdict, "tokens": len(session.tokens)}


@dataclass
class _Feeds:
    """One stream's feed frames of a round: the state before the first, each frame's ids."""

    saved: tuple
    frames: list[tuple[Job, list[int]]] = field(default_factory=list)


class StreamWorker(_Worker):
    """Runs every live stream of one Stream model: per step, the new tokens of all streams go
    through one ``feed_many`` decode; opens, rollbacks and closes run between, in each stream's
    own order."""

    def __init__(self, guard, *, max_queue: int, on_tokens: Callable[[int], None] = lambda n: None,
                 linger: tuple[float, float, float] = (0.25, 0.002, 0.05),
                 on_cancel: Callable[[int], None] = lambda n: None):
        from edgeguard.engines.stream import atomic_texts

        self._on_tokens = on_tokens
        self._atomic = atomic_texts(guard.vocab)
        self._linger = linger  # (share of a decode step, least, most) in seconds
        self._step_s = 0.0  # a recent feed decode's duration (moving average)
        self._open = 0  # streams open now (touched by the worker thread only)
        super().__init__(guard, max_queue=max_queue, on_cancel=on_cancel)

    def _gather(self) -> None:
        """Streams fed in lockstep (each waits for its last token's verdict) send their next
        tokens at nearly the same moment: wait a little (a quarter of a recent decode step,
        2 to 50 ms) for every open stream to have a token queued, so they share one decode
        instead of drifting apart into groups that each cost a whole step."""
        share, least, most = self._linger
        deadline = time.monotonic() + min(most, max(least, share * self._step_s))
        while not self._closing:
            feeding = {job.stream for job in self._jobs if job.kind == "feed"}
            left = deadline - time.monotonic()
            if not feeding or len(feeding) >= self._open or left <= 0:
                return
            self._cv.wait(left)

    def _step(self, jobs: list[Job]) -> None:
        while jobs:
            jobs = self._round(jobs)

    def _round(self, jobs: list[Job]) -> list[Job]:
        """Run one round; returns the jobs that must wait for the round's feeds to land."""
        n_vocab = self.guard.vocab.n_vocab
        feeds: dict[LiveStream, _Feeds] = {}
        blocked: set[LiveStream] = set()
        later = []
        for job in jobs:
            stream = job.stream
            if stream is not None and stream in blocked:
                later.append(job)
            elif job.kind == "feed":
                assert stream is not None  # feed jobs always name their stream (websocket._read)
                pending = feeds.setdefault(stream, _Feeds(stream.save()))
                saved = stream.save()
                try:
                    pending.frames.append((job, stream.ids_for(job, n_vocab)))
                except Exception as e:
                    stream.restore(saved)
                    job.fail(e)
            elif stream is not None and stream in feeds:
                blocked.add(stream)
                later.append(job)
            else:
                self._run_one(job)
        feeds = {stream: pending for stream, pending in feeds.items() if pending.frames}
        if feeds:
            self._feed(feeds)
        return later

    def _run_one(self, job: Job) -> None:
        guard = self.guard
        try:
            if job.kind == "check":
                verdicts = []
                for verdict in guard.check_many(job.items, batch_size=1):  # lazy: one conversation a decode
                    verdicts.append(verdict)
                    if job.cancelled:
                        self._on_cancel(len(job.items) - len(verdicts))
                        return
                job.resolve(verdicts)
            elif job.kind == "open":
                session = guard.session(job.items[0])
                self._open += 1
                job.orphaned = self._close_orphan
                job.resolve(LiveStream(session, Retokenizer(guard.vocab.tokenize, atomic=self._atomic)))
            elif job.kind == "rollback":
                stream = job.stream
                assert stream is not None  # rollback jobs always name their stream (websocket._read)
                stream.session.rollback(job.n)  # raises before any change if n is wrong
                if job.n:  # as StreamSession.rollback does with its own pending text
                    stream.retokenizer.reset()
                job.resolve(stream.report([]))
            elif job.kind == "close":
                stream = job.stream
                assert stream is not None  # close jobs always name their stream (websocket.stream_endpoint)
                stream.session.close()
                self._open -= 1
                job.resolve(None)
            else:
                raise UsageError(f"unknown job {job.kind!r}")
        except Exception as e:
            job.fail(e)

    def _close_orphan(self, stream: LiveStream) -> None:
        """An opened stream nobody waits for (its client left during the open): close it."""
        try:
            self.submit("close", stream=stream, bounded=False)
        except QueueFull:
            pass  # shutting down: closing the guard frees the session

    def _feed(self, feeds: dict[LiveStream, _Feeds]) -> None:
        try:
            t0 = time.monotonic()
            out = self.guard.feed_many({s.session: [i for _, ids in pending.frames for i in ids]
                                        for s, pending in feeds.items()})
            self._step_s = 0.8 * self._step_s + 0.2 * (time.monotonic() - t0) if self._step_s else \
                time.monotonic() - t0
        except Exception as e:
            if len(feeds) > 1:  # find the stream that failed; the others still get their verdicts
                for stream, pending in feeds.items():
                    self._feed({stream: pending})
                return
            (stream, pending), = feeds.items()
            stream.restore(pending.saved)
            if len(pending.frames) == 1:
                pending.frames[0][0].fail(e)
                return
            # Frames that arrived together failed together: judge them one by one, as they
            # would have been had they come apart, so only the frame at fault fails.
            for job, _ in pending.frames:
                self._feed_alone(stream, job)
            return
        for stream, pending in feeds.items():
            verdicts = out[stream.session]
            self._on_tokens(len(verdicts))
            at = 0
            for k, (job, ids) in enumerate(pending.frames):
                # Only a stream's last frame of the step reports the state: it is the state
                # after all of the step's tokens.
                job.resolve(stream.report(verdicts[at: at + len(ids)], with_state=k == len(pending.frames) - 1))
                at += len(ids)

    def _feed_alone(self, stream: LiveStream, job: Job) -> None:
        saved = stream.save()
        try:
            ids = stream.ids_for(job, self.guard.vocab.n_vocab)
            verdicts = self.guard.feed_many({stream.session: ids})[stream.session]
        except Exception as e:
            stream.restore(saved)
            job.fail(e)
            return
        self._on_tokens(len(verdicts))
        job.resolve(stream.report(verdicts))
