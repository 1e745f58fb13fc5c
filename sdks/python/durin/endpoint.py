"""Serving handlers: the endpoint that Durin calls, one request per attempt."""
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, List, Mapping, Optional, Tuple, Union

from .context import Cancelled, Context, Stop, TerminalError
from .signature import SignatureError, Verifier

log = logging.getLogger("durin")

Headers = List[Tuple[str, str]]


@dataclass
class _Route:
    service: str
    handler: str
    fn: Callable[[Context, Any], Any]
    options: dict = field(default_factory=dict)


def _problem(status: int, title: str, detail: str = None, type: str = None) -> Tuple[int, Headers, bytes]:
    body = {"type": type or "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    return status, [("content-type", "application/problem+json")], json.dumps(body).encode()


class Endpoint:
    """Serves handlers to Durin over plain HTTP.

    `durin`: the gateway's URL (context API; default $DURIN_URL or http://127.0.0.1:8080).
    `egress`: Durin's egress URL, for `ctx.http` (default $DURIN_EGRESS).
    `verify_key`: Durin's public key (the JWK or answer of GET /v1/signing-key, its base64
    `public_key`, or 32 raw bytes): every request must then carry a good v3 signature,
    or is refused with 401. Needs the `cryptography` package.
    """

    def __init__(self, durin: Optional[str] = None, egress: Optional[str] = None,
                 verify_key: Union[dict, bytes, str, None] = None):
        self.durin = durin or os.environ.get("DURIN_URL", "http://127.0.0.1:8080")
        self.egress = egress or os.environ.get("DURIN_EGRESS")
        self._verifier = Verifier(verify_key) if verify_key is not None else None
        self._routes = {}

    def configure(self, durin: Optional[str] = None, egress: Optional[str] = None,
                  verify_key: Union[dict, bytes, str, None] = None) -> "Endpoint":
        """Change the addresses or the key after construction (e.g. from the command line)."""
        self.durin = durin or self.durin
        self.egress = egress or self.egress
        if verify_key is not None:
            self._verifier = Verifier(verify_key)
        return self

    # -- declaring handlers

    def handler(self, service: str, handler: str, path: Optional[str] = None, **options):
        """Decorator: serve `fn(ctx, input)` as `service/handler` at `path` (default
        /service/handler). `options` (retry_policy, start_to_close, ...) go into
        `deployment()`; `key={"pointer": "/account"}` (or `{"header": "x-tenant",
        "limit": 2}`) makes it keyed: one (or `limit`) at a time per key (docs/keys.md)."""
        def register(fn):
            self._routes[path or f"/{service}/{handler}"] = _Route(service, handler, fn, options)
            return fn
        return register

    def workflow(self, name: str, **options):
        """Decorator: serve `fn(ctx, input)` as the workflow `name` (its handler `run`)."""
        return self.handler(name, "run", **options)

    def deployment(self, url: str) -> dict:
        """The body of POST {admin}/v1/deployments that declares these handlers at `url`."""
        services = {}
        for path, r in self._routes.items():
            spec = {"name": r.handler, "path": path, **r.options}
            services.setdefault(r.service, []).append(spec)
        return {"url": url, "services": [{"name": s, "handlers": h} for s, h in services.items()]}

    # -- one request

    def handle(self, method: str, path: str, headers: Union[Mapping[str, str], Iterable[Tuple[str, str]]],
               body: bytes) -> Tuple[int, Headers, bytes]:
        """Answer one request from Durin: (status, [(header, value)], body). Headers are a
        mapping or (name, value) pairs (pairs let the signature check see duplicates)."""
        pairs = list(headers.items() if isinstance(headers, Mapping) else headers)
        route = self._routes.get(path.split("?", 1)[0])
        if route is None:
            return _problem(404, "no such handler", path)
        if method != "POST":
            return _problem(405, "handlers are called with POST")
        if self._verifier is not None:
            try:
                self._verifier.verify(path, pairs, body)
            except SignatureError as error:
                return _problem(401, "not signed by Durin", str(error))
        lower = {k.lower(): v for k, v in pairs}
        try:
            ctx = Context(lower, self.durin, self.egress)
            input = json.loads(body) if body.strip() else None
        except TerminalError as error:
            return _problem(error.answer_status, error.message)
        except ValueError as error:
            return _problem(400, "the input is not JSON", str(error))
        try:
            output = route.fn(ctx, input)
            return 200, [("content-type", "application/json")], json.dumps(output).encode()
        except Stop as stop:
            if stop.suspended:  # NEW-CONTRACT §5: Durin logs the attempt as suspended
                return 202, [("durin-suspended", "true")], b""
            if stop.answer is not None:  # continued as new: the answer is ignored
                return 200, [("content-type", "application/json")], json.dumps(stop.answer).encode()
            return _problem(503, "attempt stopped", str(stop))
        except Cancelled as error:
            return _problem(409, "cancelled", str(error), "urn:durin:problem:cancelled")
        except TerminalError as error:
            return _problem(error.answer_status, error.message, type=error.type)
        except Exception as error:  # anything else: not done, try again later
            log.warning("%s/%s attempt %s of %s failed: %r", route.service, route.handler,
                        ctx.attempt, ctx.invocation_id, error,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            return _problem(503, "handler failed", f"{type(error).__name__}: {error}")
        finally:
            ctx.close()

    # -- serving with http.server

    def make_server(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        """A ThreadingHTTPServer (HTTP/1.1, keep-alive) serving this endpoint."""
        return _Server((host, port), _make_request_handler(self))

    def serve(self, host: str = "127.0.0.1", port: int = 0, announce: str = None) -> None:
        """Serve forever. Prints `{announce} listening on http://host:port` when given."""
        server = self.make_server(host, port)
        if announce:
            print(f"{announce} listening on http://{host}:{server.server_address[1]}", flush=True)
        server.serve_forever()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        """Serve in a background thread; `server.shutdown()` stops it."""
        server = self.make_server(host, port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a caller that went away (a killed Durin) is not an error here
        super().handle_error(request, client_address)


def _make_request_handler(endpoint: Endpoint):
    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # the answer's head and body in one segment (flushed after each request), no Nagle:
        # otherwise Nagle and a delayed ACK add ~40 ms to every answer
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _serve(self):
            status, headers, body = endpoint.handle(self.command, self.path, self.headers.items(),
                                                    self._read_body())
            try:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_POST = do_GET = do_PUT = do_DELETE = do_PATCH = _serve

    return RequestHandler
