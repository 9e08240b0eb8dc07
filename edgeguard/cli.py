"""The `edgeguard` command line: thin wrappers that map errors to exit codes.

Exit codes: 0 ok / not flagged, 1 flagged under the policy, 2 usage error, 3 model or runtime error.
Results go to stdout; progress and messages to stderr.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from edgeguard.errors import EdgeguardError

log = logging.getLogger("edgeguard")


def _progress(message: str) -> None:
    click.echo(f"edgeguard: {message}", err=True)


def handle_errors(fn):
    """One-line message and the error's exit code; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = (ctx.find_root().params or {}).get("debug", False)
        try:
            return fn(*args, **kwargs)
        except EdgeguardError as e:
            if debug:
                raise
            click.echo(f"edgeguard: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("edgeguard: interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            if debug:
                raise
            click.echo(f"edgeguard: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(3)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (including llama.cpp's own log) to stderr.")
@click.version_option(package_name="edgeguard")
def main(debug: bool, verbose: bool) -> None:
    """Run the Qwen3Guard safety models on this machine."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="edgeguard: %(message)s")


@main.command()
@click.argument("src")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--quant", default=None, help="Comma-separated quants (default f16,q8_0,q4_k_m).")
@click.option("--name", default=None, help="File stem of the outputs (default: from SRC).")
@click.option("--revision", default=None, help="Hub revision when SRC is a repo id.")
@handle_errors
def convert(src: str, out: Path, quant: str | None, name: str | None, revision: str | None) -> None:
    """Convert a Hugging Face checkpoint (folder or hub repo id) to GGUF (+ ONNX heads)."""
    from edgeguard_convert import ConvertOptions, convert as run_convert
    from edgeguard_convert.quantize import parse_quants

    quants = parse_quants(quant)
    src_path = Path(src)
    source = None
    if not src_path.exists() and _looks_like_repo_id(src):
        from edgeguard import hub

        src_path, commit = hub.download_repo(src, revision=revision)
        source = {"repo": src, "revision": commit}
        name = name or src.split("/")[-1].lower()
    elif not src_path.exists():
        raise click.BadParameter(f"{src} is neither a folder nor a hub repo id", param_hint="SRC")
    manifest = run_convert(src_path, out, ConvertOptions(quants=quants, name=name, source=source), progress=_progress)
    for fname, entry in manifest.files.items():
        click.echo(f"{out / fname}\t{entry['size']}\t{entry['sha256']}")


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))
