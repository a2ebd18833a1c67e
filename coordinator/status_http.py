"""The coordinator's status API over HTTP: /status, /metrics, /healthz, /readyz.

A stdlib `ThreadingHTTPServer` on a background thread: the status API must not add a dependency
or an event loop to the coordinator, and a slow scraper must not block a round. Each request
asks `snapshot()` for a fresh `Status`, so the server holds no state of its own.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from fsl_edge.status import Status

from . import metrics

log = logging.getLogger("fsl_edge.status")

JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"

# (status code, content type, body) of one response.
Response = tuple[int, str, bytes]


class _Server(ThreadingHTTPServer):
    # Request threads must not keep the coordinator alive at exit.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: StatusServer):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # an IPv6 literal such as "::1"
        self.api = api
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self._answer(include_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(include_body=False)

    def _answer(self, include_body: bool) -> None:
        code, content_type, body = self.server.api.respond(urlsplit(self.path).path)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # every answer is a live snapshot
        self.end_headers()
        if include_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's signature)
        # The default writes every request to stderr, which would drown the coordinator's own
        # output under a scrape every few seconds.
        log.debug("%s %s", self.address_string(), format % args)


class StatusServer:
    """Serve a coordinator's status over HTTP from a background thread.

    `snapshot` is called once per /status or /metrics request, from a request thread: it must be
    thread-safe and cheap (copy the state under a lock, don't compute under it). `ready` decides
    /readyz. Port 0 binds a free port; `url` gives the one actually bound once started.
    """

    def __init__(self, snapshot: Callable[[], Status], ready: Callable[[], bool],
                 host: str = "127.0.0.1", port: int = 0):
        self.snapshot = snapshot
        self.ready = ready
        self.host = host
        self.port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. http://127.0.0.1:8780."""
        if self._httpd is None:
            raise RuntimeError("StatusServer.url is known only after start()")
        port = self._httpd.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    def start(self) -> StatusServer:
        """Bind and serve on a daemon thread; returns self. Raises OSError if the port is taken."""
        if self._httpd is not None:
            raise RuntimeError("StatusServer already started")
        self._httpd = _Server((self.host, self.port), self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fsl-edge-status",
                                        daemon=True)
        self._thread.start()
        log.info("status API at %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd, self._thread = None, None

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def respond(self, path: str) -> Response:
        """Answer one GET for `path`; any exception becomes a 500 so the server keeps serving."""
        route = self._routes().get(path.rstrip("/") or "/")
        if route is None:
            return _text(HTTPStatus.NOT_FOUND, "not found: try /status, /metrics, /healthz, /readyz\n")
        try:
            return route()
        except Exception as e:  # noqa: BLE001 (a bad snapshot must not take the API down)
            log.warning("status API: %s failed", path, exc_info=True)
            return _text(HTTPStatus.INTERNAL_SERVER_ERROR, f"status unavailable: {type(e).__name__}\n")

    def _routes(self) -> dict[str, Callable[[], Response]]:
        return {"/status": self._status, "/metrics": self._metrics,
                "/healthz": self._healthz, "/readyz": self._readyz}

    def _status(self) -> Response:
        # model_dump_json rather than json.dumps(model_dump()): a NaN loss becomes null, which
        # is valid JSON, where json.dumps would write a bare NaN that strict parsers reject.
        return HTTPStatus.OK, JSON_TYPE, self.snapshot().model_dump_json().encode()

    def _metrics(self) -> Response:
        return HTTPStatus.OK, metrics.CONTENT_TYPE, metrics.render_status(self.snapshot()).encode()

    def _healthz(self) -> Response:
        # Liveness only: answering at all is the proof. Readiness is /readyz's question.
        return _text(HTTPStatus.OK, "ok\n")

    def _readyz(self) -> Response:
        if self.ready():
            return _text(HTTPStatus.OK, "ready\n")
        return _text(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")


def _text(code: int, message: str) -> Response:
    return code, TEXT_TYPE, message.encode()
