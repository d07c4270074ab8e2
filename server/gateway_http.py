"""The edge gateway's HTTP API: the server devices connect to, and its request handler.

:class:`DeviceHTTPServer` gives each connection its own thread (TLS handshakes happen there
too) and can cut every connection, so that closing it never waits on a device. Its handler
serves the protocol in ``client/device/PROTOCOL.md``: it authenticates each request, routes
it to the :class:`~fedge.server.gateway.DeviceFleet` that runs the rounds, bounds what it
reads (Content-Length, body sizes, JSON) and answers in JSON or blobs. A request it refuses
gets a :class:`Refusal`: a status and one line saying why. stdlib HTTP and TLS.
"""

import json
import logging
import math
import re
import socket
import socketserver
import ssl
import threading
from contextlib import suppress
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, parse_qs, urlsplit

from fedge.errors import FedgeError
from fedge.models.blob import read_json

if TYPE_CHECKING:
    from fedge.server.gateway import DeviceFleet

log = logging.getLogger("fedge.gateway")

MAX_RESULT_BYTES = 64 * 2**20  # a result blob; larger ones get 413 unread
MAX_JSON_BYTES = 2**20  # a hello or a failure
IDLE_SECONDS = 30.0  # a connection's socket timeout: an idle keep-alive, a stalled upload
TASK_PATH = re.compile(r"/v1/tasks/([^/]+)/(weights|result|failure)")
PROGRAM_PATH = re.compile(r"/v1/programs/([^/]+)")
JSON_TYPE, BLOB_TYPE = "application/json", "application/octet-stream"


def _size(text: str) -> int | None:
    """A Content-Length's number of bytes, or None when it is not one: ASCII digits only
    (int() would take "²" and "+5", or fail on thousands of digits)."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None


def one_line(value: object, limit: int) -> str:
    """Text a device sent, safe for one log or error line."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


class Refusal(Exception):
    """An HTTP answer other than success: status and the one line saying why."""

    def __init__(self, status: int, reason: str, close: bool = False) -> None:
        super().__init__(reason)
        self.status, self.reason, self.close = status, reason, close


class DeviceHTTPServer(ThreadingHTTPServer):
    """Threads per connection, TLS handshakes in those threads, and a way to cut every
    connection so that closing the server never waits on a device."""

    daemon_threads = False
    block_on_close = True  # server_close() joins every connection's thread
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], fleet: "DeviceFleet",
                 context: ssl.SSLContext | None, family: socket.AddressFamily) -> None:
        self.address_family = family
        self.fleet = fleet
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._cut = False
        super().__init__(address, _Handler)
        if context is not None:
            # Handshakes happen in each connection's thread, not in the accepting loop.
            self.socket = context.wrap_socket(self.socket, server_side=True,
                                              do_handshake_on_connect=False)

    def server_bind(self) -> None:
        # HTTPServer's own looks the host up in DNS (getfqdn), which may hang.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def finish_request(self, request: socket.socket, client_address: object) -> None:
        with self._connections_lock:
            if self._cut:
                return
            self._connections.add(request)
        try:
            request.settimeout(IDLE_SECONDS)
            if isinstance(request, ssl.SSLSocket):
                request.do_handshake()
            self.RequestHandlerClass(request, client_address, self)
        except OSError as error:  # a device that went away, a failed handshake, a timeout
            log.debug("connection from %s ended: %s", client_address, error)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def cut_connections(self) -> None:
        """Shut every open connection down, waking the threads that read from them."""
        with self._connections_lock:
            self._cut = True
            connections = list(self._connections)
        for connection in connections:
            with suppress(OSError):
                socket.socket.shutdown(connection, socket.SHUT_RDWR)  # below TLS


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fedge-gateway/1"
    timeout = IDLE_SECONDS
    disable_nagle_algorithm = True  # headers and body are two writes: send both at once
    server: DeviceHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s: %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, a method it lacks), as JSON."""
        self.log_error("code %d, message %s", code, message)
        self._send(code, {"error": message or HTTPStatus(code).phrase}, close=True)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        fleet = self.server.fleet
        try:
            name = fleet._authenticate(self.headers.get("Authorization"))
            if name is None:
                raise Refusal(401, "missing or unknown token: send 'Authorization: Bearer "
                                   "<token>' with this device's token")
            fleet._seen(name)
            status, payload = self._route(fleet, name, method, self._url())
        except Refusal as refusal:
            close = refusal.close or (method == "POST" and not self._drained())
            self._send(refusal.status, {"error": refusal.reason}, close=close)
            return
        self._send(status, payload)

    def _route(self, fleet: "DeviceFleet", name: str, method: str, url: SplitResult
               ) -> tuple[int, object]:
        path = url.path
        task_path, program_path = TASK_PATH.fullmatch(path), PROGRAM_PATH.fullmatch(path)
        if path == "/v1/hello":
            self._need(method, "POST")
            return 200, fleet._hello(name, self._read_json())
        if path == "/v1/task":
            self._need(method, "GET")
            return fleet._next_task(name, self._wait_seconds(url.query, fleet))
        if program_path:
            self._need(method, "GET")
            return 200, fleet._program(program_path[1])
        if task_path:
            task, what = task_path[1], task_path[2]
            if what == "weights":
                self._need(method, "GET")
                return 200, fleet._weights(name, task)
            self._need(method, "POST")
            fleet._open_for_answer(name, task)
            try:
                body = self._failure() if what == "failure" else self._read_body(
                    MAX_RESULT_BYTES)
            except Refusal as refusal:  # an answer all the same: the round need not wait
                fleet._answer(name, task, f"rejected: {refusal.reason}")
                raise
            if isinstance(body, str):
                fleet._answer(name, task, f"failed: {body}")
                return 200, {"recorded": True}
            fleet._result(name, task, body)
            return 200, {"accepted": True}
        raise Refusal(404, f"no such path: {one_line(path, 80)}")

    def _url(self) -> SplitResult:
        try:
            return urlsplit(self.path)
        except ValueError:  # "http://[::1/v1/task": a bracket that does not close
            raise Refusal(400, f"{one_line(self.path, 80)} is not a URL") from None

    @staticmethod
    def _need(method: str, expected: str) -> None:
        if method != expected:
            raise Refusal(405, f"use {expected} for this path")

    @staticmethod
    def _wait_seconds(query: str, fleet: "DeviceFleet") -> float:
        values = parse_qs(query).get("wait", ["0"])
        try:
            wait = float(values[-1])
        except ValueError:
            wait = math.nan
        if not math.isfinite(wait) or wait < 0:
            raise Refusal(400, "wait must be a non-negative number of seconds")
        return min(wait, fleet.settings.poll_seconds)

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise Refusal(411, "send the body with a Content-Length, not chunked", close=True)
        text = self.headers.get("Content-Length")
        if text is None:
            raise Refusal(411, "the body needs a Content-Length", close=True)
        length = _size(text)
        if length is None:
            raise Refusal(400, f"Content-Length {one_line(text, 30)} is not a size",
                          close=True)
        if length > limit:
            raise Refusal(413, f"the body is {length} bytes, over the limit of {limit}",
                          close=True)
        data = self.rfile.read(length)
        self._body_read = True
        if len(data) != length:
            raise Refusal(400, f"the body ended after {len(data)} of {length} bytes",
                          close=True)
        return data

    def _drained(self) -> bool:
        """Whether the body of a refused request is read (a small unread one is read and
        dropped, so the device gets its answer rather than a reset connection)."""
        if self._body_read:
            return True
        length = _size(self.headers.get("Content-Length") or "")
        if length is None or length > MAX_JSON_BYTES or self.headers.get("Transfer-Encoding"):
            return False
        return len(self.rfile.read(length)) == length

    def _read_json(self) -> object:
        data = self._read_body(MAX_JSON_BYTES)
        try:
            return read_json(data, "the body")
        except FedgeError as error:
            raise Refusal(400, one_line(str(error), 300)) from None

    def _failure(self) -> str:
        """Why the device cannot train, from a failure's body."""
        body = self._read_json()
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, str):
            raise Refusal(400, 'a failure needs "error": why this device cannot train')
        return one_line(error, 300)

    def _send(self, status: int, payload: object, close: bool = False) -> None:
        if isinstance(payload, bytes):
            body, content_type = payload, BLOB_TYPE
        elif payload is None:
            body, content_type = b"", None
        else:
            body, content_type = json.dumps(payload, allow_nan=False).encode(), JSON_TYPE
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(body)
