"""What `mpis serve` allows one client, so that slow, idle, numerous or oversized clients cannot stop it
serving the others.

uvicorn times out only the idle wait between keep-alive requests, counts connections only once a request
head has arrived, and asyncio's accept loop logs a traceback for every failed accept (up to the backlog
per loop turn) once the process is out of file descriptors. So here:
- a connection cap below the open-files limit, kept where asyncio accepts (`Listener.accept`): at the cap
  a newcomer evicts the oldest connection that has not sent a complete request; when every connection is
  busy with a request, the newcomer is answered 503 and closed at once, so descriptors never run out;
- deadlines for a request's head and its body (`GuardedProtocol`, uvicorn's h11 protocol);
- a log line repeated by clients at most once per interval (`RateLimitFilter`).
Linux and macOS (the selector event loop, whose accept goes through the socket object).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from mpis.errors import MpisError

MIB = 1 << 20
DEFAULT_MAX_CONNECTIONS = 1024
FD_RESERVE = 64  # descriptors left to the rest of the process: the event loop, model and library files
MAX_HEAD_BYTES = 16 << 10  # request line and headers (h11's default, set so that it stays documented)
BODY_MIN_RATE = 64 << 10  # bytes/s: each such many bytes received extend the body deadline by a second
LOG_INTERVAL_S = 10.0
log = logging.getLogger("uvicorn.error")  # uvicorn's own, so that its lines and these are limited alike


@dataclass(frozen=True)
class Limits:
    """What one client may take; the defaults are `mpis serve`'s. Sizes in bytes, times in seconds."""

    max_body_bytes: int = 64 * MIB  # Triton's default --http-max-input-size
    max_json_bytes: int = 8 * MIB  # JSON decodes to 3-25x its size in Python objects, binary data to 1x
    max_connections: int | None = None  # None: DEFAULT_MAX_CONNECTIONS, or fewer if the open-files limit says so
    header_timeout: float = 10.0  # for a request head, from the connection or from the previous response
    body_timeout: float = 30.0  # for a body after its head, plus a second per BODY_MIN_RATE bytes received
    keep_alive_timeout: float = 5.0  # an idle connection between requests (uvicorn's timeout_keep_alive)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_bytes", "max_connections"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise MpisError(f"{name} must be a positive integer, got {value!r}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise MpisError(f"{name} must be positive, got {getattr(self, name)!r}")

    @property
    def json_bytes(self) -> int:
        return min(self.max_json_bytes, self.max_body_bytes)


def connection_cap(requested: int | None) -> tuple[int, str | None]:
    """The connection cap, and a note when it is below what was asked: the connections and their eviction
    headroom must fit in the open-files limit, less the descriptors open now and FD_RESERVE. The soft limit
    is raised toward the hard one first if that is what it takes."""
    want = requested or DEFAULT_MAX_CONNECTIONS
    in_use = len(os.listdir("/dev/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return want, None
    need = in_use + FD_RESERVE + want + _headroom(want)
    if soft < need and soft != hard:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):  # a platform may refuse; the soft limit then stands
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    cap = min(want, (soft - in_use - FD_RESERVE) * 8 // 9)
    if cap < 1:
        raise MpisError(f"the open-files limit of {soft} leaves no descriptor for connections (raise ulimit -n)")
    note = None if cap == want else f"at most {cap} connections at once: the open-files limit is {soft} (ulimit -n)"
    return cap, note


def _headroom(cap: int) -> int:
    return max(1, cap // 8)


def http_response(status: int, message: str) -> bytes:
    """A whole `connection: close` response with {"error": message}, for where no ASGI app answers."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGuard:
    """The open connections of one server: those that may be evicted (waiting for a request head or the
    rest of a body), oldest first, and those busy with a complete request."""

    def __init__(self, cap: int):
        self.cap = cap
        self.headroom = _headroom(cap)  # evicted connections close on the loop's next turn, not at once
        self.open = 0  # accepted and not yet lost: evicted ones and those not yet made included
        self.waiting: dict[GuardedProtocol, None] = {}  # a dict for its order: oldest first
        self.busy: set[GuardedProtocol] = set()
        self.refusal = http_response(503, f"the server is at its limit of {cap} connections; retry later")

    def verdict(self) -> bool | None:
        """For the next connection: True to keep it (evicting the oldest waiting one at the cap), False to
        refuse it (every connection is busy with a request), None to leave it in the backlog for a loop turn
        (connections are settling: just accepted and not yet made, or evicted and not yet closed)."""
        if self.open < self.cap or (self.waiting and self.open < self.cap + self.headroom):
            return True
        return None if self.waiting or self.open > len(self.busy) else False

    def admit(self) -> None:
        if self.open >= self.cap:
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.transport.abort()
            log.warning("connection cap of %d reached: closed the oldest one without a complete request", self.cap)
        self.open += 1

    def waits(self, connection: GuardedProtocol, anew: bool) -> None:
        """`connection` owes a request (`anew`: it starts waiting now, the newest) or the rest of one."""
        self.busy.discard(connection)
        if anew:
            self.waiting.pop(connection, None)
        self.waiting.setdefault(connection, None)

    def works(self, connection: GuardedProtocol) -> None:
        self.waiting.pop(connection, None)
        self.busy.add(connection)

    def lost(self, connection: GuardedProtocol) -> None:
        self.waiting.pop(connection, None)
        self.busy.discard(connection)
        self.open -= 1

    def refuse(self, conn: socket.socket) -> None:
        """Answer 503 and close, without handing the connection to the event loop."""
        log.warning("connection refused with 503: all %d connections are busy with requests", self.cap)
        try:
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # what the client already sent: closing with unread
                conn.recv(MAX_HEAD_BYTES)  # data would reset the connection before the client reads the 503
            conn.send(self.refusal)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client is gone; nothing to tell it
        finally:
            conn.close()


class Listener(socket.socket):
    """The listening socket. asyncio's selector loop accepts through its accept(), so the connection cap is
    kept here: open descriptors never pass the cap and its headroom, whatever arrives in one loop turn."""

    guard: ConnectionGuard

    def accept(self) -> tuple[socket.socket, Any]:
        while True:  # until one is kept; BlockingIOError ends asyncio's accept loop until the next turn
            verdict = self.guard.verdict()
            if verdict is None:
                raise BlockingIOError
            conn, address = super().accept()
            if verdict:
                self.guard.admit()
                return conn, address
            self.guard.refuse(conn)


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for what the client owes: a request head (header_timeout,
    from the connection or the previous response) or the rest of a body (body_timeout after the head, plus
    a second per BODY_MIN_RATE bytes). A client past it gets 408 if it sent part of a request, and is
    closed; the guard sees it waiting, and so evictable, until its request is complete."""

    def __init__(self, *args: Any, guard: ConnectionGuard, limits: Limits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard, self.limits = guard, limits
        self.phase: object = None  # the client's h11 state when last looked at
        self.deadline = math.inf
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._track()

    def data_received(self, data: bytes) -> None:
        if self.phase is h11.SEND_BODY:
            self.deadline += len(data) / BODY_MIN_RATE
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.guard.lost(self)
        if self.timer is not None:
            self.timer.cancel()

    def _track(self) -> None:
        state = self.conn.their_state
        if state is self.phase or self.transport.is_closing():
            return
        self.phase = state
        if state is h11.IDLE:  # waiting for a head: the newest of the waiting
            self.guard.waits(self, anew=True)
            self.deadline = self.loop.time() + self.limits.header_timeout
        elif state is h11.SEND_BODY:  # still waiting, in its place
            self.guard.waits(self, anew=False)
            self.deadline = self.loop.time() + self.limits.body_timeout
        else:  # its request is complete: the app has it
            self.guard.works(self)
            self.deadline = math.inf
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if self.deadline == math.inf else self.loop.call_at(self.deadline, self._expire)

    def _expire(self) -> None:
        now = self.loop.time()
        if self.flow.read_paused:  # the server stopped reading (the app is behind), not the client
            self.deadline = max(self.deadline, now + self.limits.body_timeout)
        if now < self.deadline:  # extended by the body received since
            self.timer = self.loop.call_at(self.deadline, self._expire)
            return
        self.timer = None
        if self.phase is h11.SEND_BODY and not self.cycle.response_started:
            self.transport.write(http_response(408, f"request body not received within {self._body_time()}"))
        elif self.conn.trailing_data[0]:  # part of a head
            timeout = self.limits.header_timeout
            self.transport.write(http_response(408, f"request head not received within {timeout:g} s"))
        self.transport.close()

    def _body_time(self) -> str:
        return f"{self.limits.body_timeout:g} s (+1 s per {BODY_MIN_RATE >> 10} KiB received)"


class RateLimitFilter(logging.Filter):
    """Lets each message through at most once per LOG_INTERVAL_S, so that clients repeating what gets logged
    (malformed requests, connections over the cap, running out of descriptors) cannot flood the log; the
    next one let through says how many were left out."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, tuple[float, int]] = {}  # message -> (when last let through, left out since)

    def filter(self, record: logging.LogRecord) -> bool:
        now, key = time.monotonic(), str(record.msg)
        last, left_out = self.seen.get(key, (-math.inf, 0))
        if now - last < LOG_INTERVAL_S:
            self.seen[key] = (last, left_out + 1)
            return False
        if len(self.seen) > 256:  # messages with their values in them never repeat: forget them
            self.seen.clear()
        self.seen[key] = (now, 0)
        if left_out:
            record.msg = f"{record.msg} ({left_out} more like this in the last {now - last:.0f} s)"
        return True


_RATE_LIMIT = RateLimitFilter()


def limit_log_rate() -> None:
    """Rate-limit uvicorn's error log (where its protocol and this module write), once per process."""
    if _RATE_LIMIT not in log.filters:
        log.addFilter(_RATE_LIMIT)


def loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: running out of descriptors in accept() is one rate-limited line
    (asyncio's default logs a traceback per failed accept); the rest goes to asyncio's default."""
    if context.get("message") == "socket.accept() out of system resource":
        error = context.get("exception")
        log.error("cannot accept connections for a second: %s (lower --max-connections or raise ulimit -n)", error)
    else:
        loop.default_exception_handler(context)
