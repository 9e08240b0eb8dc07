"""Progress of long work (scan, convert, pull) on stderr.

On a terminal: a tqdm bar with rate and ETA. Elsewhere (a log file, a pipe, CI): one plain
line every ``PLAIN_INTERVAL_S`` seconds and one at the end, since a bar redrawn with carriage
returns turns a log into noise. Where there is no stderr (a windowed app), nothing is shown.
"""

from __future__ import annotations

import io
import sys
import time

from tqdm import tqdm

from edgeguard.platform import console

PLAIN_INTERVAL_S = 10.0
_NOWHERE = io.StringIO()  # what a disabled bar is given instead of a missing stderr
_PLAIN_FORMAT = ("edgeguard: {desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) "
                 "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")
_PLAIN_FORMAT_NO_TOTAL = "edgeguard: {desc}: {n_fmt} [{elapsed}, {rate_fmt}]{postfix}"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Bar(tqdm):
    """A tqdm bar that prints plain periodic lines when its stream is not a terminal.

    Also usable as ``tqdm_class`` for huggingface_hub downloads.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.stderr)
        if kwargs["file"] is None:  # a windowed app: tqdm would write to None
            kwargs["file"], kwargs["disable"] = _NOWHERE, True
        self._plain = not _is_terminal(kwargs["file"])
        if self._plain:
            kwargs.setdefault("mininterval", PLAIN_INTERVAL_S)
            # leave=False: tqdm's close then asks display() for its last line (see below)
            # instead of writing a bare newline after it.
            kwargs["leave"] = False
            kwargs.setdefault("ascii", True)
        self._last_line = time.monotonic()
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self._plain:
            return super().display(msg, pos)
        final = msg == ""  # how tqdm's close() with leave=False clears the bar
        now = time.monotonic()
        if final or now - self._last_line >= PLAIN_INTERVAL_S:
            self._last_line = now
            meter = dict(self.format_dict)
            meter["bar_format"] = _PLAIN_FORMAT if meter.get("total") else _PLAIN_FORMAT_NO_TOTAL
            self.fp.write(self.format_meter(**meter) + "\n")
            self.fp.flush()
        return None

    def clear(self, nolock=False):
        if not self._plain:
            super().clear(nolock)


def bar(*, total: int | None, desc: str, unit: str, initial: int = 0, enabled: bool = True,
        unit_scale: bool = False) -> Bar:
    """A progress bar on stderr (``enabled=False``: one that prints nothing)."""
    return Bar(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, dynamic_ncols=True,
               unit_scale=unit_scale)


def message(text: str) -> None:
    """A line on stderr that does not break a bar being drawn there (none without a stderr)."""
    stream = console.stderr()
    if stream is not None:
        Bar.write(f"edgeguard: {text}", file=stream)
