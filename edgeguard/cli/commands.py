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

from edgeguard.cli.eval import eval_command
from edgeguard.cli.exit_codes import exit_codes, handle_errors, is_debug, say
from edgeguard.cli.serve import serve
from edgeguard.errors import UsageError
from edgeguard.kinds import ENGINES
from edgeguard.platform import console

log = logging.getLogger("edgeguard")


class _Group(click.Group):
    """Every command, decorated with ``handle_errors`` or not, exits with a documented code."""

    def invoke(self, ctx: click.Context):
        return exit_codes(lambda: super(_Group, self).invoke(ctx), is_debug(ctx))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (including llama.cpp's own log) to stderr.")
@click.version_option(package_name="edgeguard")
def main(debug: bool, verbose: bool) -> None:
    """Run the Qwen3Guard safety models on this machine."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="edgeguard: %(message)s")
    console.tolerant_stdout()  # a Windows code page that lacks a character: escaped, not a crash


@main.command()
@click.argument("src")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--quant", default=None, help="Comma-separated quants (default f16,q8_0,q4_k_m).")
@click.option("--name", default=None, help="File stem of the outputs (default: from SRC).")
@click.option("--revision", default=None, help="Hub revision when SRC is a repo id.")
@handle_errors
def convert(src: str, out: Path, quant: str | None, name: str | None, revision: str | None) -> None:
    """Convert a Hugging Face checkpoint (folder or hub repo id) to GGUF (+ ONNX heads)."""
    from edgeguard_convert import ConvertOptions
    from edgeguard_convert import convert as run_convert
    from edgeguard_convert.quantize import parse_quants

    quants = parse_quants(quant)
    src_path = Path(src)
    source = None
    if not src_path.exists() and _looks_like_repo_id(src):
        from edgeguard.models import hub

        src_path, commit = hub.download_repo(src, revision=revision)
        source = {"repo": src, "revision": commit}
        name = name or src.split("/")[-1].lower()
    elif not src_path.exists():
        raise click.BadParameter(f"{src} is neither a folder nor a hub repo id", param_hint="SRC")
    options = ConvertOptions(quants=quants, name=name, source=source, show_progress=True)
    manifest = run_convert(src_path, out, options, progress=say)
    for fname, entry in manifest.files.items():
        click.echo(f"{out / fname}\t{entry['size']}\t{entry['sha256']}")


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


# -- shared options ------------------------------------------------------------------------
def _read_text(value: str, what: str) -> str:
    """TEXT or '-' for stdin; bytes must be valid UTF-8 and the text not empty."""
    if value == "-":
        raw = sys.stdin.buffer.read()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{what} from stdin is not valid UTF-8 (byte {e.start})") from e
    elif any(0xDC80 <= ord(c) <= 0xDCFF for c in value):  # undecodable argv bytes
        raise UsageError(f"{what} is not valid UTF-8")
    if "\x00" in value:
        raise UsageError(f"{what} contains NUL bytes (binary input?)")
    if not value.strip():
        raise UsageError(f"{what} is empty")
    return value


def _budget_aside(fn):
    """Keep --max-memory out of the commands' signatures: _load reads it from the context."""

    @functools.wraps(fn)
    def wrapper(*args, max_memory=None, **kwargs):
        click.get_current_context().meta["edgeguard.max_memory_mb"] = max_memory
        return fn(*args, **kwargs)

    return wrapper


def model_options(fn):
    fn = _budget_aside(fn)
    fn = click.option("--model", "model", default=None,
                      help="Registry name, converted folder or HF checkpoint folder "
                      "(default: the registry's default).")(fn)
    fn = click.option("--quant", default=None,
                      help="Which quant of the model to load (default q4_k_m when present).")(fn)
    fn = click.option("--offline", is_flag=True, default=None, help="Never use the network.")(fn)
    fn = click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all).")(fn)
    fn = click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
                      help="Where llama.cpp runs the model: auto uses the GPU when this build supports one.")(fn)
    fn = click.option("--max-memory", "max_memory", type=click.IntRange(min=1), default=None, metavar="MB",
                      help="Memory budget of the engine: bounds the context, picks a q8_0 KV cache if needed.")(fn)
    return fn


def _load(model, quant, engine, policy, offline, threads, device="auto"):
    from edgeguard.loader import load

    verbose = logging.getLogger("edgeguard").isEnabledFor(logging.DEBUG)
    budget = click.get_current_context().meta.get("edgeguard.max_memory_mb")
    return load(model, quant, engine=engine, policy=policy, offline=offline, progress=say,
                n_threads=threads, device=device, max_memory_mb=budget, verbose=verbose)


def _summary(verdict) -> str:
    cats = ", ".join(verdict.categories) or "no category"
    scores = "  ".join(f"{k} {v:.3f}" for k, v in verdict.scores.items())
    line = f"{verdict.label} ({cats})  [{scores}]"
    if verdict.refusal is not None:
        line += f"  refusal: {verdict.refusal}"
    return line + ("  -> flagged" if verdict.flagged else "") + f" under {verdict.policy}"


# -- check / scan --------------------------------------------------------------------------
@main.command()
@click.argument("text")
@click.option("--response", default=None, help="The assistant's response to judge ('-' reads stdin).")
@click.option("--engine", type=click.Choice(ENGINES), default=None, help="Engine (default: by the model's kind).")
@click.option("--policy", default="strict", show_default=True, help="strict, loose or a policy TOML file.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as one JSON object.")
@click.option("--generate", is_flag=True, help="Gen only: decode the verdict text greedily (the official way).")
@model_options
@handle_errors
def check(text, response, engine, policy, as_json, generate, model, quant, offline, threads, device):
    """Judge TEXT (a prompt; with --response, the response to it). TEXT '-' reads stdin.

    Exit status: 0 not flagged, 1 flagged, 2 usage error, 3 model or runtime error.
    """
    if text == "-" and response == "-":
        raise UsageError("only one of TEXT and --response can read stdin")
    prompt = _read_text(text, "TEXT")
    response = None if response is None else _read_text(response, "--response")
    if engine == "stream" and response is not None:
        raise UsageError("--engine stream checks prompts; use `edgeguard stream` for responses")
    with _load(model, quant, engine, policy, offline, threads, device) as guard:
        if generate:
            if guard.engine != "gen":
                raise UsageError("--generate needs a Gen model")
            generated = guard.generate(prompt, response)
            click.echo(console.json_text({"text": generated}) if as_json else generated)
            return
        verdict = guard.check(prompt, response) if response is not None else guard.check(prompt)
    click.echo(console.json_text(verdict.to_dict()) if as_json else _summary(verdict))
    sys.exit(1 if verdict.flagged else 0)


@main.command()
@click.argument("infile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "outfile", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Output JSONL ('-': stdout, which cannot be resumed).")
@click.option("--restart", is_flag=True, help="Overwrite --out instead of resuming it.")
@click.option("--engine", type=click.Choice(ENGINES), default=None)
@click.option("--policy", default="strict", show_default=True)
@click.option("--ray", "use_ray", is_flag=True,
              help="Run on Ray Data actors (needs the ray extra); IN may be .jsonl, .parquet or .csv, "
                   "--out .jsonl or .parquet.")
@click.option("--address", default=None,
              help="With --ray: the Ray cluster (auto, ray://host:10001; default: a new local one).")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --ray: guard actors, each with --threads threads (default 1) (default: CPUs // threads).")
@model_options
@handle_errors
def scan(infile, outfile, restart, engine, policy, use_ray, address, actors, model, quant, offline, threads, device):
    """Check every line of IN.jsonl ({"prompt", "response"?, "id"?}) into OUT.jsonl.

    One output line per input line, written as it is produced. Rerunning resumes after the
    last complete output line, but only when OUT.jsonl.scan.json shows the same input lines,
    model, quant, policy and engine (else exit 2; --restart starts over). Blank lines give
    {"line", "skipped"}, lines that cannot be checked {"line", "id"?, "error"}.

    Exit status: 0 every line checked and none flagged, 1 some line flagged, 2 no line flagged
    but some malformed (or a usage error), 3 model or runtime error. Counts go to stderr.
    """
    from edgeguard.loader import resolve
    from edgeguard.scan.writer import identity, open_output, run_scan

    to_stdout = outfile == "-"
    if use_ray:
        stats = _scan_with_ray(infile, outfile, to_stdout, restart, engine, policy, address, actors, model, quant,
                               offline, threads, device)
    elif address is not None or actors is not None:
        raise UsageError("--address and --actors need --ray")
    else:
        with open_output(infile, None if to_stdout else Path(outfile), sys.stdout.buffer) as output:
            _, _, loaded_quant = resolve(model, quant, kind=engine or "gen", offline=offline, progress=say)
            with _load(model, quant, engine, policy, offline, threads, device) as guard:
                stats = run_scan(guard, infile, output, identity=identity(guard, loaded_quant), restart=restart)
    resumed = f", {stats.kept} kept from an earlier run" if stats.kept else ""
    say(f"scanned {stats.done} lines{resumed}: {stats.flagged} flagged, {stats.malformed} malformed, "
              f"{stats.blank} blank -> {'stdout' if to_stdout else outfile}")
    sys.exit(stats.exit_code)


def _scan_with_ray(infile, outfile, to_stdout, restart, engine, policy, address, actors, model, quant, offline,
                   threads, device):
    from edgeguard.scan.ray import quiet_ray_logs, require_ray, scan_with_ray
    from edgeguard.scan.writer import open_output

    require_ray()  # before anything is opened: without the extra this is a usage error
    quiet_ray_logs(verbose=log.isEnabledFor(logging.DEBUG))
    with open_output(infile, None if to_stdout else Path(outfile), sys.stdout.buffer) as output:
        return scan_with_ray(infile, output, address=address, restart=restart, actors=actors,
                             threads_per_actor=threads or 1, model=model, quant=quant, engine=engine,
                             policy=policy, device=device, offline=offline)


# -- registry and local store -----------------------------------------------------------
def _spec(name: str):
    from edgeguard.models import registry

    return registry.get_model(name)


@main.command()
@click.argument("name")
@click.option("--quant", default=None, help="Quant to convert to (default: the registry's default).")
@click.option("--offline", is_flag=True, default=None, help="Use only the local Hugging Face cache.")
@handle_errors
def pull(name, quant, offline):
    """Download (cache first), convert and verify a registry model."""
    from edgeguard.models import store
    from edgeguard_convert.quantize import parse_quants

    spec = _spec(name)
    quant = parse_quants(quant)[0] if quant else spec.default_quant
    if store.is_pulled(spec, quant):
        say(f"{name} ({quant}) is already pulled")
    folder = store.pull(spec, quant, offline=offline, progress=say)
    click.echo(str(folder))


@main.command("models")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def models_cmd(as_json):
    """List the registry with what is pulled locally, and each model's size on disk and in
    memory at its default quant (computed from its shape: see docs/models.md)."""
    from edgeguard.models import registry, store

    rows = []
    for name, spec in sorted(registry.load_registry().items()):
        local = store.pulled(spec)
        feet = spec.footprint()
        rows.append({
            "name": name, "kind": spec.kind, "repo": spec.repo, "revision": spec.revision,
            "default_quant": spec.default_quant, "license": spec.license,
            "disk_mb": round(feet.disk_mb) if feet else None, "ram_mb": round(feet.ram_mb) if feet else None,
            "pulled": [{"quant": m.quant, "size": m.size, "path": str(m.folder)} for m in local],
        })
    if as_json:
        click.echo(console.json_text(rows, indent=2))
        return
    for row in rows:
        pulled_text = ", ".join(f"{p['quant']} ({p['size'] / 1e6:.0f} MB)" for p in row["pulled"]) or "not pulled"
        sizes = (f"{row['default_quant']} {row['disk_mb']:>5} MB disk {row['ram_mb']:>5} MB RAM"
                 if row["disk_mb"] is not None else f"{row['default_quant']} (size unknown)")
        click.echo(f"{row['name']:<14} {row['kind']:<7} {row['repo']:<30} {sizes:<36} {pulled_text}")


@main.command()
@click.argument("name")
@click.option("--quant", default=None, help="Remove only this quant.")
@handle_errors
def rm(name, quant):
    """Remove a pulled model from the local store."""
    from edgeguard.models import store

    removed = store.remove(_spec(name), quant)
    if not removed:
        raise UsageError(f"{name} is not pulled" + (f" in {quant}" if quant else ""))
    for folder in removed:
        click.echo(f"removed {folder}")


@main.command()
@click.argument("name")
@handle_errors
def verify(name):
    """Re-check the sha256 of every file of a pulled model."""
    from edgeguard.errors import IntegrityError
    from edgeguard.models import store

    results = store.verify(_spec(name))
    if not results:
        raise UsageError(f"{name} is not pulled (run: edgeguard pull {name})")
    bad = {folder: files for folder, files in results.items() if files}
    for folder, files in results.items():
        click.echo(f"{folder}: {'ok' if not files else 'BAD: ' + ', '.join(files)}")
    if bad:
        raise IntegrityError(f"{name}: corrupted files; repair with: edgeguard rm {name} && edgeguard pull {name}")


# -- stream --------------------------------------------------------------------------------
def _stdin_chunks(follow: bool):
    """The response from stdin: as it arrives (follow) or all at once, decoded incrementally."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    stream = sys.stdin.buffer
    read = getattr(stream, "read1", stream.read) if follow else stream.read
    try:
        while True:
            data = read(4096) if follow else read()
            if not data:
                break
            text = decoder.decode(data)
            if text:
                yield text
            if not follow:
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
    except UnicodeDecodeError as e:
        raise UsageError("the response on stdin is not valid UTF-8") from e


@main.command()
@click.option("--prompt", required=True, help="The user's prompt ('-' reads stdin).")
@click.option("--response", default=None, help="The response to judge token by token (default: stdin).")
@click.option("--policy", default="strict", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one per token, then a verdict line.")
@click.option("--follow", is_flag=True, help="Read the response from stdin as it arrives and print as it goes.")
@model_options
@handle_errors
def stream(prompt, response, policy, as_json, follow, model, quant, offline, threads, device):
    """Judge a prompt, then every token of a response (Stream models).

    Exit status: 0 not flagged, 1 flagged, 2 usage error, 3 model or runtime error.
    """
    from edgeguard.cli.stream import run_stream

    if prompt == "-" and response is None:
        raise UsageError("with --prompt -, give the response with --response")
    prompt = _read_text(prompt, "--prompt")
    if response is not None:
        chunks = [_read_text(response, "--response")]
    elif sys.stdin.isatty() and not follow:
        raise UsageError("give --response TEXT or pipe the response on stdin")
    else:
        chunks = _stdin_chunks(follow)
    with _load(model, quant, "stream", policy, offline, threads, device) as guard:
        state = run_stream(guard, prompt, chunks, as_json=as_json, follow=follow)
    from edgeguard.policy import decide

    categories = [state.category] if state.category else []
    sys.exit(1 if state.flagged and decide(guard.policy, state.label, categories) else 0)


# -- doctor --------------------------------------------------------------------------------
@main.command()
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--no-self-test", is_flag=True, help="Skip the decode of a tiny model in a child process.")
@click.option("--reserve-mb", type=click.FloatRange(min=0), default=None,
              help="Memory to keep for your own LLM when choosing the model size that fits (default 4096).")
@handle_errors
def doctor(device, as_json, no_self_test, reserve_mb):
    """What this machine's llama.cpp build can do, and a self-test in a child process.

    Exit status: 0 healthy, 3 when the self-test failed or crashed (the report says what to change).
    """
    from edgeguard.doctor import DEFAULT_RESERVE_MB, gather, render

    reserve = DEFAULT_RESERVE_MB if reserve_mb is None else reserve_mb
    report = gather(device, self_test=not no_self_test, reserve_mb=reserve)
    click.echo(console.json_text(report, indent=2) if as_json else render(report))
    sys.exit(0 if report["healthy"] else 3)


main.add_command(eval_command)
main.add_command(serve)
