"""The `edgeguard serve` command: load the models, bind, run the ASGI app on uvicorn.

The server stack is an extra (``pip install 'edgeguard[server]'``); without it the command
exits 2 and says so.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys

import click

from edgeguard.cli.exit_codes import handle_errors, say
from edgeguard.errors import UsageError
from edgeguard.platform.memory import freeze_startup_objects
from edgeguard.platform.net import own_port, stop_signals

INSTALL_HINT = "pip install 'edgeguard[server]'"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to the address (port 0: one the system picks), not listening yet: a port
    in use fails before the models load, and nobody connects before they have."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        own_port(sock)  # SO_REUSEADDR; SO_EXCLUSIVEADDRUSE on Windows, where the first would share the port
        sock.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def _access_log() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edgeguard: %(message)s"))
    access = logging.getLogger("edgeguard.access")
    access.handlers[:] = [handler]
    access.setLevel(logging.INFO)
    access.propagate = False


@click.command()
@click.option("--model", default=None, help="Gen model: registry name, converted folder or checkpoint folder "
                                            "(default: the registry's Gen model unless only --stream-model is given).")
@click.option("--stream-model", default=None, help="Stream model for /v1/stream (optional).")
@click.option("--quant", default=None, help="Which quant of the models to load (default q4_k_m when present).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--policy", default="strict", show_default=True, help="strict, loose or a policy TOML file.")
@click.option("--api-key", envvar="EDGEGUARD_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (also EDGEGUARD_API_KEY); needed off loopback.")
@click.option("--max-body", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body in bytes (more: 413).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Conversations that may wait per engine (more: 503 with Retry-After).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Gen conversations decoded together (default: 4 on a CPU, the engine's max_batch, 8, on a GPU).")
@click.option("--max-streams", type=click.IntRange(min=1), default=15, show_default=True,
              help="WebSocket streams open at once (more: refused with 503 / close 1013).")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              help="Seconds a request's headers, then its body, may take to arrive (more: 408).")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=120, show_default=True,
              help="Seconds a WebSocket stream may wait for its client's next frame (more: closed).")
@click.option("--upstream", default=None, metavar="URL",
              help="Guard this OpenAI-compatible LLM server (its base URL, e.g. http://127.0.0.1:11434/v1): "
                   "serve its POST /v1/chat/completions and GET /v1/models, every token judged (docs/proxy.md).")
@click.option("--upstream-key", envvar="EDGEGUARD_UPSTREAM_KEY", default=None,
              help="API key for the upstream (also EDGEGUARD_UPSTREAM_KEY); never the client's key.")
@click.option("--upstream-timeout", type=click.FloatRange(min=0, min_open=True), default=120, show_default=True,
              help="Seconds to wait for the upstream to connect or send more (then 504, or an error chunk).")
@click.option("--on-flag", type=click.Choice(["cut", "care"]), default="cut", show_default=True,
              help="A flagged answer: cut the stream, or roll back and let the upstream continue (CARE).")
@click.option("--care-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Flagged continuations before CARE cuts.")
@click.option("--refusal-text", default=None, help="Text of a refused prompt or a cut answer ('' for none).")
@click.option("--holdback", type=click.IntRange(min=0), default=0, show_default=True,
              help="Judged tokens held back beyond what the debounce needs (room for CARE).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads per engine (default: all).")
@click.option("--offline", is_flag=True, default=None, help="Never use the network.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (uvicorn, llama.cpp) to stderr.")
@handle_errors
def serve(model, stream_model, quant, host, port, device, policy, api_key, max_body, max_queue, max_batch,
          max_streams, request_timeout, idle_timeout, threads, offline, verbose, **upstream):
    """Serve the models over HTTP: OpenAI's POST /v1/moderations, POST /v1/check, WebSocket
    /v1/stream, GET /health, /ready and /metrics.

    With --upstream URL, also POST /v1/chat/completions and GET /v1/models in front of that
    OpenAI-compatible LLM server, every token of its answers judged (docs/proxy.md).

    Binds 127.0.0.1 unless --host says otherwise; any other address needs an API key.
    SIGTERM or Ctrl-C (Ctrl+Break on Windows) finish the requests in flight, then exit 0.
    """
    try:
        import uvicorn

        from edgeguard.server.app import ServerConfig, create_app
        from edgeguard.server.slow_clients import http_protocol
    except ImportError as e:
        click.echo(f"edgeguard: error: `edgeguard serve` needs the server extra ({e.name} is missing): "
                   f"{INSTALL_HINT}", err=True)
        sys.exit(2)
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty")
    if not is_loopback(host) and not api_key:
        raise UsageError(f"refusing to listen on {host} without an API key: give --api-key or set "
                         "EDGEGUARD_API_KEY (or bind 127.0.0.1)")
    proxy = _proxy_config(**upstream)
    if proxy is not None:  # the guard shares the CPU with the LLM: its threads wait, never spin
        from edgeguard.server.proxy.cpu import share_cpu

        share_cpu()
    if verbose:
        logging.getLogger("edgeguard").setLevel(logging.DEBUG)
    _access_log()
    sock = bind(host, port)
    guards = {}
    try:
        guards = _load_models(model, stream_model, quant, policy, offline, threads, device, verbose, max_streams)
        config = ServerConfig(api_key=api_key, max_body=max_body, max_queue=max_queue, max_batch=max_batch,
                              request_timeout=request_timeout, idle_timeout=idle_timeout)
        app = create_app(guards.get("gen"), guards.get("stream"), config, proxy=proxy)
        sock.listen(128)
        shown = f"[{host}]" if ":" in host else host
        names = ", ".join(f"{kind}: {g.name}" for kind, g in guards.items())
        click.echo(f"edgeguard: serving on http://{shown}:{sock.getsockname()[1]} ({names})", err=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=False,
                                               lifespan="on", timeout_graceful_shutdown=30,
                                               ws_max_size=max_body,
                                               http=http_protocol(request_timeout)))  # 408 for half-sent heads too
        # uvicorn handles SIGTERM/SIGINT (and Ctrl+Break's SIGBREAK on Windows: drain, then shut
        # down) and re-raises the signal after restoring the handlers it found: these make that
        # last step a clean exit 0.
        for sig in stop_signals():
            signal.signal(sig, lambda *_: None)
        freeze_startup_objects()  # models and imports: no full collection walks them again
        server.run(sockets=[sock])
    finally:
        sock.close()
        for guard in guards.values():
            guard.close()
    click.echo("edgeguard: stopped", err=True)


def _proxy_config(upstream, upstream_key, upstream_timeout, on_flag, care_retries, refusal_text, holdback):
    if upstream is None:
        given = [name for name, value in (("--upstream-key", upstream_key), ("--refusal-text", refusal_text))
                 if value is not None]
        if given or on_flag != "cut" or holdback:
            raise UsageError(f"{', '.join(given) or '--on-flag/--holdback'} needs --upstream")
        return None
    from edgeguard.server.proxy import ProxyConfig
    from edgeguard.server.proxy.config import DEFAULT_REFUSAL

    return ProxyConfig(upstream=upstream, upstream_key=upstream_key, upstream_timeout=upstream_timeout,
                       on_flag=on_flag, care_retries=care_retries, holdback=holdback,
                       refusal_text=DEFAULT_REFUSAL if refusal_text is None else refusal_text)


def _load_models(model, stream_model, quant, policy, offline, threads, device, verbose, max_streams) -> dict:
    from edgeguard.loader import load

    wanted = {"gen": model} if model is not None or stream_model is None else {}
    if stream_model is not None:
        wanted["stream"] = stream_model
    guards = {}
    try:
        for engine, name in wanted.items():
            # One Stream sequence more than the streams: /v1/check on the Stream model uses it.
            extra = {"max_sessions": max_streams + 1} if engine == "stream" else {}
            guards[engine] = load(name, quant, engine=engine, policy=policy, offline=offline, progress=say,
                                  n_threads=threads, device=device, verbose=verbose, **extra)
    except BaseException:
        for guard in guards.values():
            guard.close()
        raise
    return guards
