"""The one HTTP/1.1 server of eda, driven by its daemon's own poll loop.

A daemon serves HTTP beside its ZeroMQ sockets (``--http HOST:PORT``,
``--metrics HOST:PORT``) with a :class:`Server` made on its loop
(:class:`eda.core.daemon.Daemon`, or anything with the same ``watch_events``,
``forget``, ``every`` and ``after``): one thread, no locks, and a handler sees
the daemon's state as it is between two steps of the loop.  A thread of its
own was not taken: every handler needs that state, so each request would
cross a hand-off (a queue and a wake-up of the loop) both ways, and the
state would need locks; bench/bench_http.py measures the loop as it is.

Routes are by method and path (:meth:`Server.route`); a path may hold
``{name}`` segments, given to the handler in :attr:`Request.params`.  A
handler takes a :class:`Request` and returns a :data:`Response`, the tuple
``(status, headers, body)``::

    server.route("GET", "/metrics", lambda req: (200, {"content-type": TEXT}, text))

or ``None`` when it answers later: :meth:`Request.respond` (once, e.g. after
the commit that makes an event durable) or :meth:`Request.stream`
(Server-Sent Events: :func:`sse`).  :func:`json_response` and
:func:`problem` (RFC 9457 ``application/problem+json``) build the usual
answers; a handler may also raise :class:`HttpError`, or an
:class:`~eda.core.errors.EdaError` (usage: 400, not found: 404, else 500).

The parser is ``httptools`` (llhttp, Node.js's parser): measured on a
keep-alive CloudEvents POST it costs 6 us a request, a bounded stdlib parser
16 us and ``h11`` about 50 times more; it also gives chunked request bodies
and strict framing (no request smuggling by conflicting lengths) for free.

Limits against hostile clients (CONVENTIONS.md §7), all in :class:`Limits`:
the request head (line and headers) and the number of headers, the body
(checked against ``Content-Length`` before it is read, and as chunks come),
a deadline to send the whole request once it began (slowloris), an idle
timeout between requests, requests queued on one connection (pipelining: a
hard limit, whatever one read holds; the request past it is answered 429 and
the connection closed after it), bytes queued for a client that does not
read, bytes queued for all clients together (the output budget: past it the
connections whose queue has waited the longest to be read are cut, so many
slow readers cannot hold more than the budget and clients that read are
served), and a cap on connections: at the cap a new connection closes the
one idle the longest, so well-behaved clients are served with thousands of
idle connections held open.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import httptools
import zmq

from .daemon import BindError, bind_failed
from .endpoint import Endpoint
from .errors import EdaError, ExitStatus, ProtocolError

Headers = Mapping[str, str] | Sequence[tuple[str, str]]
Response = tuple[int, Headers, bytes]
Handler = Callable[["Request"], "Response | None"]

JSON_TYPE = "application/json"
PROBLEM_TYPE = "application/problem+json"
SSE_TYPE = "text/event-stream"
READ_SIZE = 65536
SWEEP_EVERY = 0.5  # s between two looks for connections past a deadline
REASONS = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 411: "Length Required", 413: "Content Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 507: "Insufficient Storage",
}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    head_bytes: int = 16384  # request line and headers
    headers: int = 100  # header fields in one request
    body_bytes: int = 1 << 20  # one request's body
    request_time: float = 10.0  # s to send a whole request once its first byte came
    idle_time: float = 60.0  # s a connection may wait between requests
    pipelined: int = 16  # requests queued behind the one being answered (one more: 429, closed)
    output_bytes: int = 8 << 20  # queued for one client; a stream beyond it waits, then is cut
    output_budget: int = 128 << 20  # queued for all clients; beyond it the slowest are cut
    stalled_time: float = 30.0  # s a client may leave its full queue unread before it is cut
    connections: int = 4096  # open at once (the oldest idle one makes room for a new one)
    ping_time: float = 15.0  # s between two comments on every open stream (proxies, dead peers)


class Loop(Protocol):
    """What the server needs of its daemon's loop (:class:`eda.core.daemon.Daemon` has it)."""

    def watch_events(
        self, target: Any, what: str, handler: Callable[[int], object], events: int
    ) -> None: ...
    def forget(self, target: Any) -> None: ...
    def every(self, interval: float, what: str, step: Callable[[], object]) -> Any: ...
    def guarded(self, what: str, step: Callable[..., object], *args: Any) -> bool: ...


class HttpError(EdaError):
    """Raised by a handler: answered as ``application/problem+json`` with *status*."""

    def __init__(self, status: int, detail: str, *, title: str = "", **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.title, self.extra = status, detail, title, extra


def dumps(value: Any) -> str:
    """Compact JSON text (UTF-8 kept) of a value eda built."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_response(status: int, value: Any, headers: Headers = ()) -> Response:
    """*value* as a JSON body (compact, UTF-8)."""
    return status, [("content-type", JSON_TYPE), *_pairs(headers)], dumps(value).encode()


def problem(status: int, detail: str, *, title: str = "", **extra: Any) -> Response:
    """An RFC 9457 problem: ``type`` about:blank, ``title`` (the status's reason unless
    given), ``status``, ``detail``, and any *extra* members."""
    value = {
        "type": "about:blank",
        "title": title or REASONS.get(status, "Error"),
        "status": status,
        "detail": detail,
        **extra,
    }
    return status, [("content-type", PROBLEM_TYPE)], dumps(value).encode()


def sse(data: str, *, id: str | int | None = None, event: str | None = None) -> bytes:
    """One Server-Sent Event: ``id:``, ``event:`` and one ``data:`` line per line of *data*."""
    out = []
    if id is not None:
        out.append(f"id: {id}\n")
    if event is not None:
        out.append(f"event: {event}\n")
    out.extend(f"data: {line}\n" for line in data.split("\n"))
    out.append("\n")
    return "".join(out).encode()


def _pairs(headers: Headers) -> Sequence[tuple[str, str]]:
    return list(headers.items()) if isinstance(headers, Mapping) else headers


def _status_of(exc: EdaError) -> int:
    if isinstance(exc, ProtocolError):  # what the client sent is not what was asked for
        return 400
    if exc.exit_code == ExitStatus.USAGE:
        return 400
    if exc.exit_code == ExitStatus.NOT_FOUND:
        return 404
    return 503 if exc.exit_code == ExitStatus.TIMEOUT else 500


class Request:
    """One request, read whole: method, path, query, headers (lower-case names), body."""

    __slots__ = ("_conn", "_done", "body", "headers", "keep_alive", "method", "params",
                 "path", "query", "refusal", "target")  # fmt: skip

    def __init__(self, conn: _Connection, method: str, target: str,
                 headers: dict[str, str], body: bytes, keep_alive: bool) -> None:  # fmt: skip
        self._conn, self._done = conn, False
        self.method, self.target, self.headers = method, target, headers
        self.body, self.keep_alive = body, keep_alive
        split = urlsplit(target)
        self.path = unquote(split.path)
        self.query: dict[str, list[str]] = parse_qs(split.query, keep_blank_values=True)
        self.params: dict[str, str] = {}
        self.refusal: tuple[int, str] | None = None  # answered so, not handled (a limit)

    @property
    def peer(self) -> str:
        """The client's address, ``HOST:PORT``."""
        return self._conn.peer

    def arg(self, name: str) -> str | None:
        """The last value of query parameter *name* (``""`` when given bare), or None."""
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> Any:
        """The body as strict JSON; :class:`HttpError` 400 when it is not."""
        from .attributes import loads

        try:
            return loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None

    @property
    def answered(self) -> bool:
        return self._done

    @property
    def gone(self) -> bool:
        """Whether the client hung up (an answer would go nowhere)."""
        return self._conn.closed

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        """Answer this request (once; later calls are ignored), then go on to the next."""
        if self._done:
            return
        self._done = True
        self._conn.send_response(self, status, headers, body)

    def stream(self, headers: Headers = (("content-type", SSE_TYPE),)) -> Stream:
        """Answer 200 with a body that goes on until :meth:`Stream.close` (or the client
        leaves); the connection is not reused after it."""
        self._done = True
        return self._conn.start_stream(headers, head_only=self.method == "HEAD")


class Stream:
    """An open response body (Server-Sent Events): write to it while it has room."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._on_close: Callable[[], object] | None = None
        self.on_room: Callable[[], object] | None = None  # what was queued went out
        self.on_written: Callable[[], object] | None = None  # more went out (see written)

    @property
    def on_close(self) -> Callable[[], object] | None:
        """Called once the client left or it was cut; set on a stream already closed
        (the client reset the connection before its head went out), it runs at once."""
        return self._on_close

    @on_close.setter
    def on_close(self, call: Callable[[], object] | None) -> None:
        self._on_close = call
        if call is not None and self._conn.closed and self._conn.stream is not self:
            self._on_close = None
            self._conn.server.loop.guarded("HTTP stream", call)

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def room(self) -> bool:
        """Whether the client takes what is sent (its queue is under the limit)."""
        conn = self._conn
        return not (conn.closed or conn.closing) and len(conn.out) < conn.server.limits.output_bytes

    @property
    def written(self) -> int:
        """Bytes of this connection handed to the kernel so far (its head included): what
        a client that is gone may still have missed is only what sat in socket buffers."""
        return self._conn.written

    @property
    def queued(self) -> int:
        """Where the end of what was sent so far lies, counted as :attr:`written` is: once
        ``written`` reaches it, all of it went out (on a closed stream it never will)."""
        conn = self._conn
        return conn.written + len(conn.out)

    def send(self, data: bytes) -> None:
        self._conn.write(data)

    def close(self) -> None:
        """End the body: what is queued goes out, then the connection closes."""
        self._conn.finish()


class _Parsing:
    """httptools' callbacks for one connection: collects each request as it is parsed."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.url = b""
        self.headers: dict[str, str] = {}
        self.count = 0
        self.head = 0
        self.body: list[bytes] = []
        self.body_size = 0

    def on_message_begin(self) -> None:
        self.url, self.headers, self.count, self.head = b"", {}, 0, 0
        self.body, self.body_size = [], 0
        if self.conn.began is None:
            self.conn.began = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        self._grow(len(name) + len(value) + 4)
        if self.count > self.conn.server.limits.headers:
            raise _Refused(431, f"more than {self.conn.server.limits.headers} header fields")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def _grow(self, n: int) -> None:
        self.head += n
        if self.head > self.conn.server.limits.head_bytes:
            raise _Refused(431, f"request head over {self.conn.server.limits.head_bytes} bytes")

    def on_headers_complete(self) -> None:
        length = self.headers.get("content-length")
        limit = self.conn.server.limits.body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise _Refused(413, f"body of {length} bytes, more than {limit}")

    def on_body(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size > self.conn.server.limits.body_bytes:
            raise _Refused(413, f"body over {self.conn.server.limits.body_bytes} bytes")
        self.body.append(data)

    def on_message_complete(self) -> None:
        parser = self.conn.parser
        self.conn.received(
            parser.get_method().decode("ascii", "replace"),
            self.url.decode("latin-1"),
            self.headers,
            b"".join(self.body),
            parser.should_keep_alive(),
        )


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class _Stop(Exception):
    """Raised from a parser callback: nothing more of this connection's input is parsed."""


class _Connection:
    """One client: its parser, the requests it sent, what is queued for it."""

    def __init__(self, server: Server, sock: socket.socket, peer: str) -> None:
        self.server, self.sock, self.peer = server, sock, peer
        self.fd = sock.fileno()
        self.parsing = _Parsing(self)
        self.parser = httptools.HttpRequestParser(self.parsing)
        self.out = bytearray()
        self.written = 0  # bytes handed to the kernel (Stream.written)
        self.queue: deque[Request] = deque()
        self.current: Request | None = None
        self.stream: Stream | None = None
        self.closing = False  # close once what is queued went out
        self.closed = False
        self.began: float | None = None  # when the request being read began
        self.last = time.monotonic()  # last request answered, or connected
        self.full_since: float | None = None  # since when its queue has been over the limit
        self.behind_since = 0.0  # since when its queue has held bytes (while it does)
        self.reading = True
        self.input_done = False  # past the pipelining limit: nothing more is read

    # -- input ---------------------------------------------------------------------
    def readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        if self.stream is not None or self.closing or self.input_done:
            return  # nothing more is read on a streaming or closing connection
        try:
            self.parser.feed_data(data)
        except _Stop:
            return
        except _Refused as exc:
            self.server.refused += 1
            self.fail(exc.status, exc.detail)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                return  # (the parser is left broken: it is not fed again)
            self.server.refused += 1
            if isinstance(cause, _Refused):
                self.fail(cause.status, cause.detail)
            else:
                self.fail(400, "malformed request")
        except httptools.HttpParserUpgrade:
            self.server.refused += 1
            self.fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self.server.refused += 1
            self.fail(400, f"malformed request: {str(exc)[:100]}")

    def received(self, method: str, url: str, headers: dict[str, str], body: bytes,
                 keep_alive: bool) -> None:  # fmt: skip
        self.began = None
        limit = self.server.limits.pipelined
        if len(self.queue) >= limit:
            # hard, however many requests one read held: this one is answered 429 after
            # those queued, then the connection closes; nothing more is parsed or read
            self.server.refused += 1
            self.input_done = True
            self._pause()
            refused = Request(self, method, "/", {}, b"", False)
            refused.refusal = (429, f"more than {limit} requests sent ahead of their answers: "
                               "send the rest on a new connection")  # fmt: skip
            self.queue.append(refused)
            self.next()
            raise _Stop
        self.queue.append(Request(self, method, url, headers, body, keep_alive))
        if len(self.queue) >= limit:
            self._pause()  # read no more until its answers are read
        self.next()

    def next(self) -> None:
        """Hand the next queued request to its handler when none is being answered."""
        while self.current is None and self.queue and not self.closed and self.stream is None:
            if len(self.out) >= self.server.limits.output_bytes:
                self._pause()  # it reads none of its answers: none more until it does
                return
            request = self.current = self.queue.popleft()
            if request.refusal is not None:
                request.respond(*problem(*request.refusal))
            else:
                self.server.dispatch(request)
            if not request.answered:
                return  # it answers later (respond) and comes back here
        if not self.queue and not self.reading and not self.closed and not self.input_done:
            self._resume()

    def _pause(self) -> None:
        self.reading = False
        self._watch()

    def _resume(self) -> None:
        self.reading = True
        self._watch()

    # -- output ---------------------------------------------------------------------
    def send_response(self, request: Request, status: int, headers: Headers,
                      body: bytes) -> None:  # fmt: skip
        if self.closed:
            return
        keep = request.keep_alive and not self.closing
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n",
                 f"date: {self.server.date()}\r\nserver: eda\r\n"]  # fmt: skip
        lines.extend(f"{k}: {v}\r\n" for k, v in _pairs(headers))
        lines.append(f"content-length: {len(body)}\r\n")
        if not keep:
            lines.append("connection: close\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        self.write(head + body if request.method != "HEAD" else head)
        self.server.answered += 1
        self.current = None
        self.last = time.monotonic()
        if not keep:
            self.finish()
            return
        self.next()

    def start_stream(self, headers: Headers, head_only: bool = False) -> Stream:
        lines = ["HTTP/1.1 200 OK\r\n", f"date: {self.server.date()}\r\nserver: eda\r\n",
                 "cache-control: no-store\r\nconnection: close\r\n"]  # fmt: skip
        lines.extend(f"{k}: {v}\r\n" for k, v in _pairs(headers))
        lines.append("\r\n")
        stream = self.stream = Stream(self)
        self.current = None
        self.queue.clear()
        self.write("".join(lines).encode("latin-1"))  # may close it (the client is gone)
        self.server.answered += 1
        if head_only:  # HEAD: no body; what the handler sends is dropped
            self.finish()
        return stream

    def write(self, data: bytes) -> None:
        if self.closed or not data or (self.closing and self.stream is not None):
            return  # (a stream ended: its close or a HEAD)
        server = self.server
        if not self.out:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            self.written += sent
            if sent == len(data):
                return
            data = data[sent:]
            self.out += data
            self.behind_since = time.monotonic()
            self._watch()
        else:
            self.out += data
        server.queued += len(data)
        if server.queued > server.limits.output_budget:
            server.over_budget()

    def writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.out[:sent]
        self.written += sent
        self.server.queued -= sent
        stream = self.stream
        if sent and stream is not None and stream.on_written is not None:
            self.server.loop.guarded("HTTP stream", stream.on_written)
            if self.closed:
                return
        if self.queue and self.current is None and self.stream is None:
            self.next()  # answers held back while its queue was full
            if self.closed:
                return
        if not self.out:
            self.full_since = None
            if self.closing:
                self.close()
                return
            self._watch()
            if self.stream is not None and self.stream.on_room is not None:
                self.server.loop.guarded("HTTP stream", self.stream.on_room)

    def _watch(self) -> None:
        if self.closed:
            return
        events = (zmq.POLLIN if self.reading or self.stream else 0) | (
            zmq.POLLOUT if self.out else 0
        )
        self.server.watch(self, events)

    def fail(self, status: int, detail: str) -> None:
        """Answer a request that cannot be read (problem+json), then hang up (at once
        when an earlier request is still being answered: answers go out in order)."""
        if self.current is not None or self.stream is not None:
            self.close()
            return
        self.closing = True
        self.queue.clear()
        _status, headers, body = problem(status, detail)
        fake = Request(self, "GET", "/", {}, b"", False)
        self.current = None
        self.send_response(fake, status, headers, body)

    def finish(self) -> None:
        self.closing = True
        self.reading = False
        if not self.out:
            self.close()
        else:
            self._watch()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.queued -= len(self.out)
        self.out.clear()
        self.server.dropped(self)
        with contextlib.suppress(OSError):
            self.sock.close()
        stream, self.stream = self.stream, None
        if stream is not None and stream.on_close is not None:
            self.server.loop.guarded("HTTP stream", stream.on_close)

    @property
    def idle(self) -> bool:
        """Between requests: nothing being read, answered, queued or streamed."""
        return (self.began is None and self.current is None and not self.queue
                and self.stream is None and not self.out)  # fmt: skip


class Server:
    """An HTTP/1.1 server on *loop*, listening on *address* (``HOST:PORT``)."""

    def __init__(self, loop: Loop, address: str | Endpoint, *, what: str = "HTTP",
                 limits: Limits | None = None) -> None:  # fmt: skip
        self.loop, self.what = loop, what
        self.limits = limits or Limits()
        self.routes: dict[tuple[str, ...], dict[str, Handler]] = {}
        self.conns: dict[int, _Connection] = {}
        # what /metrics reports of it (eda.core.metrics.http_families)
        self.answered = 0  # responses sent
        self.refused = 0  # requests refused as malformed or over a limit
        self.refused_connections = 0  # closed at once: at the cap, with none idle to close
        self.evicted = 0  # idle connections closed to make room at the cap
        self.cut = 0  # connections closed to bring the bytes queued back under the budget
        self.queued = 0  # bytes queued for all clients together
        self._cutting = False
        self.failures = 0  # handlers that raised (answered 500)
        self._date = (0, "")
        self._pinged = time.monotonic()
        self.listener = self._listen(address)
        host, port = self.listener.getsockname()[:2]
        self.endpoint = Endpoint(host, port)
        loop.watch_events(self.listener, f"{what} accept", lambda _e: self._accept(), zmq.POLLIN)
        self._sweeper = loop.every(SWEEP_EVERY, f"{what} deadlines", self._sweep)
        _servers.add(self)

    @property
    def port(self) -> int:
        return self.endpoint.port

    @property
    def url(self) -> str:
        host = self.endpoint.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://{Endpoint(host, self.port)}"

    def _listen(self, address: str | Endpoint) -> socket.socket:
        where = (address if isinstance(address, Endpoint)
                 else Endpoint.parse(address, self.what, default_host="127.0.0.1"))  # fmt: skip
        family = socket.AF_INET6 if where.is_ipv6 else socket.AF_INET
        host = "0.0.0.0" if where.host == "*" else where.host
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, where.port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            if isinstance(exc, socket.gaierror):
                raise BindError(f"cannot bind {self.what} on {where}: {exc.strerror}") from None
            raise bind_failed(f"{self.what} on {where}", exc.errno, exc.strerror) from None
        sock.setblocking(False)
        return sock

    # -- routes ----------------------------------------------------------------------
    def route(self, method: str, path: str, handler: Handler) -> None:
        """Call *handler* for *method* requests (``GET`` also answers ``HEAD``) on *path*;
        a ``{name}`` segment matches any one segment, given in :attr:`Request.params`."""
        self.routes.setdefault(tuple(path.strip("/").split("/")), {})[method.upper()] = handler

    def _find(self, path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
        parts = path.strip("/").split("/")
        exact = self.routes.get(tuple(parts))
        if exact is not None:
            return exact, {}
        for pattern, methods in self.routes.items():
            if len(pattern) != len(parts):
                continue
            params = {}
            for want, got in zip(pattern, parts, strict=True):
                if want.startswith("{") and want.endswith("}") and got:
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return methods, params
        return None

    def dispatch(self, request: Request) -> None:
        found = self._find(request.path)
        if found is None:
            request.respond(*problem(404, f"no such resource: {request.path[:200]}"))
            return
        methods, request.params = found
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = ", ".join(sorted(methods))
            status, headers, body = problem(405, f"{request.method} is not allowed here")
            request.respond(status, [*_pairs(headers), ("allow", allowed)], body)
            return
        try:
            answer = handler(request)
        except HttpError as exc:
            answer = problem(exc.status, exc.detail, title=exc.title, **exc.extra)
        except EdaError as exc:
            answer = problem(_status_of(exc), str(exc)[:500])
        except Exception as exc:  # a bug: say so, answer, keep serving
            self.failures += 1
            self.loop.guarded(f"{self.what} handler", _reraise, exc)
            answer = problem(500, "the server failed to handle the request")
        if answer is not None and not request.answered:
            request.respond(*answer)

    # -- connections --------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._evict()  # out of descriptors: make room for the next
                return
            if len(self.conns) >= self.limits.connections and not self._evict():
                self.refused_connections += 1
                sock.close()  # every connection is busy: this one is refused
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock, str(Endpoint(addr[0], addr[1])))
            self.conns[conn.fd] = conn
            self.watch(conn, zmq.POLLIN)

    def _evict(self) -> bool:
        """Close the connection idle the longest (or slowest to send its request)."""
        idle = [c for c in self.conns.values() if c.idle or c.began is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.began if c.began is not None else c.last)
        self.evicted += 1
        oldest.close()
        return True

    def watch(self, conn: _Connection, events: int) -> None:
        if not events:
            self.loop.forget(conn.fd)
            return
        self.loop.watch_events(conn.fd, self.what, lambda ev: self._ready(conn, ev), events)

    def _ready(self, conn: _Connection, events: int) -> None:
        if events & zmq.POLLOUT and not conn.closed:
            conn.writable()
        if events & (zmq.POLLIN | zmq.POLLERR) and not conn.closed:
            conn.readable()

    def over_budget(self) -> None:
        """More is queued for all clients together than the output budget: cut the
        connections whose queue has waited the longest to be read (the slowest readers)
        until the total is back to three quarters of the budget."""
        if self._cutting:  # (a stream's on_close, run as one is cut, wrote more)
            return
        self._cutting = True
        try:
            goal = self.limits.output_budget * 3 // 4
            behind = sorted((c for c in self.conns.values() if c.out),
                            key=lambda c: c.behind_since)  # fmt: skip
            for conn in behind:
                if self.queued <= goal:
                    break
                self.cut += 1
                conn.close()
        finally:
            self._cutting = False

    def dropped(self, conn: _Connection) -> None:
        self.conns.pop(conn.fd, None)
        self.loop.forget(conn.fd)

    def _sweep(self) -> None:
        now, limits = time.monotonic(), self.limits
        ping = now - self._pinged > limits.ping_time
        if ping:
            self._pinged = now
        for conn in list(self.conns.values()):
            if conn.began is not None and now - conn.began > limits.request_time:
                self.refused += 1
                conn.fail(408, f"the request was not sent within {limits.request_time:g} s")
            elif conn.idle and now - conn.last > limits.idle_time:
                conn.close()
            elif conn.out and len(conn.out) >= limits.output_bytes:
                conn.full_since = conn.full_since or now
                if now - conn.full_since > limits.stalled_time:
                    conn.close()  # it reads nothing of what is queued for it
            elif ping and conn.stream is not None and conn.stream.room():
                conn.stream.send(b": ping\n\n")  # an SSE comment: readers ignore it

    def date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def close(self) -> None:
        _servers.discard(self)
        self._sweeper.cancel()
        for conn in list(self.conns.values()):
            conn.close()
        self.loop.forget(self.listener)
        self.listener.close()


_servers: weakref.WeakSet[Server] = weakref.WeakSet()  # open ones


def servers_on(loop: object) -> list[Server]:
    """The HTTP servers open on *loop* (a daemon): what its ``/metrics`` reports."""
    return sorted((s for s in _servers if s.loop is loop), key=lambda s: s.what)


def _reraise(exc: Exception) -> None:
    raise exc
