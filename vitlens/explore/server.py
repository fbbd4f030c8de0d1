"""The explorer's HTTP side: the standard library's `ThreadingHTTPServer`, a random access
token, JSON answers from `ExploreData`, and the static page shipped in the package.

Why this stack: no dependency beyond Python itself (it outlives any web framework's API), no
build step, nothing fetched at run time (the page's JavaScript and CSS are files of the
package), and a local single-user tool needs no more than a threaded server whose database
calls are serialised.

Security (docs/explore.md): binds 127.0.0.1 unless told otherwise; every request needs the
token (`?token=` on the first page load, then the `X-Vitlens-Token` header the page sends, or
the cookie the first load sets), compared in constant time — without it: 403; only the files
named in `STATIC` are served (a path never reaches the file system); every value from a URL
goes to DuckDB as a bound parameter; nothing is written anywhere.
"""

from __future__ import annotations

import hmac
import importlib
import json
import secrets
import threading
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from vitlens.errors import UserError
from vitlens.explore.data import ExploreData, NotFound

#: URL path -> (package file, content type): the only files served.
STATIC: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
TOKEN_HEADER = "X-Vitlens-Token"
TOKEN_COOKIE = "vitlens_token"


def _text(query: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = query.get(name)
    return values[-1] if values else default


def _integer(query: dict[str, list[str]], name: str, default: int | None = None) -> int | None:
    value = _text(query, name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"parameter {name!r} must be an integer, got {value!r}") from None


def _flag(query: dict[str, list[str]], name: str) -> bool | None:
    value = _text(query, name)
    if value in (None, ""):
        return None
    if value not in ("true", "false"):
        raise UserError(f"parameter {name!r} must be true or false, got {value!r}")
    return value == "true"


def _required(query: dict[str, list[str]], name: str) -> str:
    value = _text(query, name)
    if not value:
        raise UserError(f"parameter {name!r} is required")
    return value


class Explorer:
    """The app: one opened result set, its token, the routes."""

    def __init__(self, data: ExploreData, token: str | None = None) -> None:
        self.data = data
        self.token = token or secrets.token_urlsafe(24)
        self.lock = threading.Lock()  # one DuckDB connection: calls are serialised
        self.routes: dict[str, Callable[[dict[str, list[str]]], Any]] = {
            "/api/variants": lambda q: self.data.variants(),
            "/api/images": lambda q: self.data.images(
                _required(q, "variant"), _integer(q, "class"), _flag(q, "correct"), _text(q, "shard") or None,
                _text(q, "sort", "image_key"), _flag(q, "desc") or False, _integer(q, "limit", 100),
                _integer(q, "offset", 0)),
            "/api/tokens": lambda q: self.data.tokens(_required(q, "variant"), _required(q, "key"),
                                                      _integer(q, "block", 0), _text(q, "stream", "resid")),
            "/api/heads": lambda q: self.data.heads(_required(q, "variant"), _required(q, "key")),
            "/api/explain": lambda q: self.data.explain(_required(q, "variant"), _required(q, "key")),
            "/api/curves": lambda q: self.data.curves(_required(q, "variant"),
                                                      [k for k in (_text(q, "keys") or "").split(",") if k]),
        }

    def authorised(self, query: dict[str, list[str]], headers: Any) -> bool:
        """Whether the request carries the token (query, header or cookie), in constant time."""
        offered = [_text(query, "token") or "", headers.get(TOKEN_HEADER) or ""]
        cookie = SimpleCookie(headers.get("Cookie") or "")
        if TOKEN_COOKIE in cookie:
            offered.append(cookie[TOKEN_COOKIE].value)
        return any(hmac.compare_digest(value.encode(), self.token.encode()) for value in offered if value)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class bound to this app."""
        app = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "vitlens-explore"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
                return  # quiet: the token must not reach a log

            def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, value: Any) -> None:
                self._send(status, json.dumps(value, default=str).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                url = urlparse(self.path)
                query = parse_qs(url.query, keep_blank_values=True)
                if not app.authorised(query, self.headers):
                    self._json(HTTPStatus.FORBIDDEN, {"error": "missing or wrong token: open the URL vitlens "
                                                               "explore printed (it carries ?token=...)"})
                    return
                if url.path in STATIC:
                    name, content_type = STATIC[url.path]
                    body = resources.files("vitlens.explore").joinpath("static", name).read_bytes()
                    cookie = f"{TOKEN_COOKIE}={app.token}; Path=/; HttpOnly; SameSite=Strict"
                    self._send(HTTPStatus.OK, body, content_type, {"Set-Cookie": cookie})
                    return
                try:
                    if url.path == "/api/picture":
                        with app.lock:
                            body = app.data.picture(_required(query, "variant"), _required(query, "key"))
                        self._send(HTTPStatus.OK, body, "image/png")
                        return
                    route = app.routes.get(url.path)
                    if route is None:
                        self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path!r}"})
                        return
                    with app.lock:
                        value = route(query)
                    self._json(HTTPStatus.OK, value)
                except NotFound as err:
                    self._json(HTTPStatus.NOT_FOUND, {"error": str(err)})
                except UserError as err:
                    self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})

            def do_POST(self) -> None:  # noqa: N802
                self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "the explorer is read-only"})

            do_PUT = do_DELETE = do_PATCH = do_POST  # noqa: N815

        return Handler

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        """A bound (not yet serving) server; `server.server_address` has the port chosen."""
        server = ThreadingHTTPServer((host, port), self.handler())
        server.daemon_threads = True
        # the pictures need torch (the eval transform): import it now, not on the first picture
        threading.Thread(target=importlib.import_module, args=("vitlens.data.geometry",), daemon=True).start()
        return server

    def url(self, server: ThreadingHTTPServer) -> str:
        """The URL to open, token included (a server bound to every interface: its loopback address)."""
        host, port = server.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{shown}:{port}/?token={self.token}"
