"""A fault-injecting HTTP proxy for S3 tests: a threaded server on 127.0.0.1 in front of an S3
endpoint (moto's server) that, per request and from a seeded RNG, answers a share with ``503
SlowDown`` (S3's XML error body), resets a share of connections (closes the socket with an RST,
no answer), stalls a share (reads the request, never answers, until the proxy stops or
``stall_s`` passes), and forwards the rest: method, path, query, headers and body as received, then
relays the upstream response. Injected faults are counted per kind.

Bodies are read whole before the dice are thrown, honouring ``Content-Length`` and
``Transfer-Encoding: chunked`` (the transport framing is removed and the body forwarded with a
``Content-Length``); ``aws-chunked`` / streaming-signed payloads are content, forwarded byte for
byte with their ``x-amz-*`` headers. ``Host`` is forwarded as the client sent it, so what the
client signed is what the upstream sees.

Use it as a context manager (or ``start()`` / ``stop()``): ``stop()`` shuts the listener,
every open client connection and their upstream connections, so nothing outlives the test.

Example::

    with FaultProxy(moto_url, slowdown=0.25, reset=0.05, seed=7) as proxy:
        ...  # point storage.endpoint_url at proxy.url
        assert proxy.counts["slowdown"] > 0
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus what the proxy re-frames
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",  # answered here (100 Continue) by BaseHTTPRequestHandler
    "content-length",  # set from the body actually forwarded
}

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
)


class FaultProxy:
    """See the module docstring. ``counts``: ``slowdown``, ``reset`` (injected) and
    ``forwarded`` (relayed to the upstream), also per method as ``slowdown:GET`` etc."""

    def __init__(
        self,
        upstream: str,
        *,
        slowdown: float = 0.0,
        reset: float = 0.0,
        stall: float = 0.0,
        seed: int = 0,
        stall_s: float = 120.0,
        upstream_timeout_s: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self.set_faults(slowdown, reset, stall)
        self.stall_s, self.upstream_timeout_s = stall_s, upstream_timeout_s
        self._stopped = threading.Event()
        self._queued: list[str] = []
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[float, str, str, str]] = []  # (time, kind, method, path) per request
        self._rng = random.Random(seed)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()

    # -- life cycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "the proxy is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopped.set()  # stalled requests end now
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for sock in list(self._open):
                _close(sock, rst=False)
            self._open.clear()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def set_faults(self, slowdown: float = 0.0, reset: float = 0.0, stall: float = 0.0) -> None:
        """Sets the shares of requests answered 503, reset and stalled, from the next on."""
        if min(slowdown, reset, stall) < 0 or slowdown + reset + stall > 1:
            raise ValueError(f"fault shares must be >= 0 and sum to <= 1: {slowdown, reset, stall}")
        with self._lock:
            self.slowdown, self.reset, self.stall = slowdown, reset, stall

    def queue(self, *kinds: str) -> None:
        """The next requests get these kinds ("slowdown", "reset", "stall", "forwarded"), in
        order, before the shares apply again."""
        with self._lock:
            self._queued.extend(kinds)

    def injected(self) -> dict[str, int]:
        """``{"slowdown": n, "reset": n, "stall": n, "forwarded": n}`` so far."""
        with self._lock:
            return {k: self.counts[k] for k in ("slowdown", "reset", "stall", "forwarded")}

    # -- per request ---------------------------------------------------------------------------
    def _draw(self, method: str) -> str:
        with self._lock:
            x = self._rng.random()  # drawn even for a queued kind: the sequence stays seeded
            kind = "forwarded"
            for name, edge in (
                ("slowdown", self.slowdown),
                ("reset", self.slowdown + self.reset),
                ("stall", self.slowdown + self.reset + self.stall),
            ):
                if x < edge:
                    kind = name
                    break
            if self._queued:
                kind = self._queued.pop(0)
            self.counts[kind] += 1
            self.counts[f"{kind}:{method}"] += 1
            return kind

    def _record(self, kind: str, method: str, path: str) -> None:
        with self._lock:
            self.log.append((time.time(), kind, method, path))

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._open.add if add else self._open.discard)(sock)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    upstream_conn: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        self.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.owner._track(self.connection, False)
            if self.upstream_conn is not None:
                self.upstream_conn.close()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # quiet: thousands of requests per test

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields (none are forwarded)
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        kind = self.owner._draw(self.command)
        self.owner._record(kind, self.command, self.path)
        if kind == "stall":
            self.owner._stopped.wait(self.owner.stall_s)
            kind = "reset"
        if kind == "reset":
            self.close_connection = True
            _close(self.connection, rst=True)
            return
        if kind == "slowdown":
            payload = b"" if self.command == "HEAD" else SLOWDOWN_BODY
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
            self.send_header("x-amz-request-id", "FAULTPROXY")
            self.end_headers()
            self.wfile.write(payload)
            return
        status, reason, headers, data = self._forward(body)
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        # a HEAD answer carries the length of the body a GET would have had
        length = dict((k.lower(), v) for k, v in headers).get("content-length")
        if self.command != "HEAD" or length is None:
            length = str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in (0, 1):  # a kept-alive upstream connection may have timed out: reopen once
            if self.upstream_conn is None:
                self.upstream_conn = http.client.HTTPConnection(
                    *self.owner.upstream, timeout=self.owner.upstream_timeout_s
                )
            conn = self.upstream_conn
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        conn.putheader(name, value)
                if body or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                conn.close()
                self.upstream_conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _close(sock: socket.socket, rst: bool) -> None:
    """Closes ``sock``; with ``rst`` the peer sees a connection reset (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
