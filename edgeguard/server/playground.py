"""The playground: ``GET /`` and ``GET /playground`` serve one page (HTML, CSS and a small script
from this package's ``static/`` folder) where a user tries the loaded models on their own texts.

The page holds no data and no key: it talks to the server only through the public endpoints
(``/v1/models``, ``/v1/check``, ``WebSocket /v1/stream``) with the key the user types, so its
paths stay open like the probes. It needs no build step and nothing from the network, so it
works offline. A strict Content-Security-Policy lets only the page's own script run: a text
that slips past its escaping still cannot execute.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PAGE_PATHS = ("/", "/playground")
ASSETS = {  # path: (file in static/, media type)
    "/playground.css": ("playground.css", "text/css; charset=utf-8"),
    "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
}
PATHS = (*PAGE_PATHS, *ASSETS)  # served without the API key: the page asks for it itself

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _static(name: str) -> bytes:
    return (resources.files("edgeguard.server") / "static" / name).read_bytes()


async def page(request: Request) -> Response:
    return Response(_static("playground.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


async def asset(request: Request) -> Response:
    name, media_type = ASSETS[request.url.path]
    return Response(_static(name), media_type=media_type, headers=HEADERS)


def routes() -> list[Route]:
    return [*(Route(p, page, methods=["GET"]) for p in PAGE_PATHS),
            *(Route(p, asset, methods=["GET"]) for p in ASSETS)]
