"""How every command ends: one line on stderr and a documented exit code.

Exit codes: 0 ok / not flagged, 1 flagged under the policy, 2 usage error, 3 model or runtime error,
130 interrupted. ``--debug`` adds the traceback but never changes the code.
"""

from __future__ import annotations

import functools
import sys
import traceback

import click

from edgeguard.errors import EdgeguardError


def say(message: str) -> None:
    click.echo(f"edgeguard: {message}", err=True)


def _fail(message: str, code: int, debug: bool) -> None:
    """Exit with ``code`` after a one-line message; --debug adds the traceback first but never
    changes the code (scripts read it: 1 means "flagged", never "crashed")."""
    if debug:
        traceback.print_exc(file=sys.stderr)
    click.echo(f"edgeguard: error: {message}", err=True)
    sys.exit(code)


def exit_codes(fn, debug: bool):
    """Run ``fn`` and map whatever it raises to the documented exit codes: an EdgeguardError
    to its own code, an OSError or any unexpected exception to 3, Ctrl-C to 130. Click's own
    exceptions (usage errors: 2) and sys.exit pass through."""
    try:
        return fn()
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except KeyboardInterrupt:
        click.echo("edgeguard: interrupted", err=True)
        sys.exit(130)
    except EdgeguardError as e:
        _fail(str(e), e.exit_code, debug)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        _fail(f"{e.strerror or e}{where}", 3, debug)
    except Exception as e:  # a bug: still one line and the runtime code, never 1 ("flagged")
        _fail(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", 3, debug)


def is_debug(ctx: click.Context) -> bool:
    return bool((ctx.find_root().params or {}).get("debug", False))


def handle_errors(fn):
    """One-line message and the error's exit code; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return exit_codes(lambda: fn(*args, **kwargs), is_debug(click.get_current_context()))

    return wrapper
