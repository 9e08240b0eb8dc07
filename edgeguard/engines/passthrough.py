"""Guard another model's text stream: pass it through a Stream session and stop at the flag."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def guard_stream(session, chunks: Iterable[str]) -> Iterator[str]:
    """Pass a text stream (for example the chunk texts of a streamed llama-cpp-python
    completion) through ``session``; yields only text that has been scored.

    What the caller sees: a prefix of the input text, possibly re-cut (a word can wait for the
    next chunk, because its tokens are final only then), in which every character has been
    judged. As soon as the session is flagged under its policy the generator stops, without
    yielding the text of the tokens fed with the flagging one; ``session.state`` then says why.
    When the input ends, the held-back tail is scored and yielded unless it flags the session.
    Stopping the input (the caller's model) on StopIteration is the caller's job.
    """
    if session.flagged:
        return
    for chunk in chunks:
        verdicts = session.feed_text(chunk)
        if session.flagged:
            return
        text = "".join(v.text for v in verdicts)
        if text:
            yield text
    verdicts = session.finish()
    if not session.flagged:
        text = "".join(v.text for v in verdicts)
        if text:
            yield text
