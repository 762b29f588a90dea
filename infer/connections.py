"""The HTTP connection layer under the server (uvicorn's h11 protocol), hardened against clients that
hold connections without finishing their requests, and a graceful uvicorn server.

- Each request must arrive in time: its head within `header_timeout` seconds of its first byte, its
  body within `body_timeout` seconds of the head. Neither clock is reset by more bytes, so a client
  dribbling a byte at a time (slowloris) gains nothing. A late head is dropped; a late body is
  answered 408 and closed.
- At most `max_connections` are open at once, below the process's file limit so that `accept()`
  never meets EMFILE. At the cap, a new connection closes the oldest connection that is still
  sending a request (or idles between requests): a flood of slow clients cannot lock out the next
  real one, such as a health check. Only when every open connection has a request in the app is
  the new one answered 503.
- `RateLimit` caps log records per message, so no client can fill the disk through the log.
- `GracefulServer` drains the engine before uvicorn's own shutdown: streams end with a finish_reason
  and `[DONE]`, not a cut connection.
"""

import asyncio
import functools
import json
import logging
import resource
import socket
import sys
import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # seconds for a connection to send a whole request head
BODY_TIMEOUT = 60.0  # seconds for a request body, after its head: 4 MiB at ~0.5 Mbit/s
SPARE_FILES = 128  # file descriptors kept free of connections: the model, logs, pipes, threads

log = logging.getLogger(__name__)


def default_max_connections() -> int:
    """The process's open-file limit less SPARE_FILES (at least 8)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, (soft if soft != resource.RLIM_INFINITY else 65536) - SPARE_FILES)


def _error_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


class ConnectionGuard:
    """What the connections of one server share: the limits, and the connections still sending a
    request (or idle between requests), oldest first: the ones a new connection may push out."""

    def __init__(self, header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                 max_connections: int | None = None):
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.max_connections = max_connections or default_max_connections()
        self.open = 0
        self.waiting: dict[GuardedH11, None] = {}  # insertion-ordered: the oldest first
        self.evicted = self.refused = 0

    def admit(self, conn: "GuardedH11") -> bool:
        """Called for each new connection: False when it must be refused (every slot busy in the app)."""
        if self.open >= self.max_connections:
            victim = next(iter(self.waiting), None)
            if victim is None:
                self.refused += 1
                log.warning("connections: all %d busy with requests; refused one (503), %d so far",
                            self.max_connections, self.refused)
                return False
            self.evicted += 1
            log.warning("connections: at the cap of %d; closed the oldest one still sending a request "
                        "(%d so far)", self.max_connections, self.evicted)
            victim.drop()
        self.open += 1
        return True


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol plus per-request deadlines and the connection cap (`ConnectionGuard`).
    A connection is in one of three phases: sending a head (or idle before one), sending a body, or
    served (the app has the whole request). The first two have deadlines and can be pushed out."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.phase: str | None = None  # "head" | "body" | None (served)
        self.deadline: asyncio.TimerHandle | None = None
        self.counted = False

    def connection_made(self, transport):
        super().connection_made(transport)
        if not self.guard.admit(self):
            transport.write(_error_response(503, "Service Unavailable", "too many open connections; retry later",
                                            "too_many_connections"))
            transport.close()
            return
        self.counted = True
        self._enter("head")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._enter("head")
        else:
            self._enter("body" if cycle.more_body else None)

    def connection_lost(self, exc):
        self._enter(None)
        if self.counted:
            self.counted = False
            self.guard.open -= 1
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._enter("head")  # idle keep-alive: waiting for the next request's head

    def _enter(self, phase: str | None) -> None:
        if phase == self.phase:
            return  # a clock runs from the phase's start: more bytes do not reset it
        self.phase = phase
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.guard.waiting.pop(self, None)
        if phase is not None:
            self.guard.waiting[self] = None
            timeout = self.guard.header_timeout if phase == "head" else self.guard.body_timeout
            self.deadline = self.loop.call_later(timeout, self._expire)

    def _expire(self) -> None:
        self.deadline = None
        if self.phase == "body":
            self.drop(f"the request body did not arrive within {self.guard.body_timeout:g} s")
        else:
            self.drop()

    def drop(self, why: str | None = None) -> None:
        """Close the connection; with `why`, after a 408 saying it (a body that came too slowly)."""
        in_body = self.phase == "body"
        self._enter(None)
        if self.transport.is_closing():
            return
        if why is not None and in_body and not self.cycle.response_started:
            self.transport.write(_error_response(408, "Request Timeout", why, "request_timeout"))
        self.transport.close()


class RateLimit(logging.Filter):
    """At most `burst` records of one message (logger, level, format string) per `interval` seconds;
    the next one that passes says how many were left out. A flood of one kind of event (closed
    connections, a failing accept) then costs the log a few lines, not gigabytes."""

    def __init__(self, burst: int = 20, interval: float = 10.0):
        super().__init__()
        self.burst, self.interval = burst, interval
        self.windows: dict[tuple, list] = {}  # key -> [window start, passed, left out]
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self.lock:
            window = self.windows.get(key)
            if window is None or now - window[0] >= self.interval:
                left_out = window[2] if window else 0
                self.windows[key] = window = [now, 0, 0]
                if left_out:
                    record.msg = f"{record.getMessage()} [{left_out} more like this in the {self.interval:g} s " \
                                 f"before, not logged]"
                    record.args = None
            if window[1] >= self.burst:
                window[2] += 1
                return False
            window[1] += 1
            if len(self.windows) > 10_000:  # keys are format strings, so this is a safety net only
                self.windows = {k: w for k, w in self.windows.items() if now - w[0] < self.interval}
        return True


def log_to_stderr() -> None:
    """Every logger (ours, uvicorn's, asyncio's) to stderr through one rate-limited handler; the
    `infer` loggers at INFO (per-request lines, throughput, the engine's layout)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("infer").setLevel(logging.INFO)


def uvicorn_config(app, host: str, port: int, guard: ConnectionGuard | None = None, **kwargs) -> uvicorn.Config:
    """uvicorn's config with the guarded protocol; its loggers propagate to ours (no config of its own)."""
    http = functools.partial(GuardedH11, guard=guard or ConnectionGuard())
    return uvicorn.Config(app, host=host, port=port, http=http, log_level="warning", log_config=None, **kwargs)


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose shutdown (SIGINT/SIGTERM) first runs `drain(grace, hurry)`: new
    requests get 503 while the running ones finish, for `grace` seconds at most (a second signal
    hurries it), the rest are cut with a finish_reason. Then uvicorn closes the connections, which
    by then have nothing in flight."""

    def __init__(self, config: uvicorn.Config, drain=None, grace: float = 10.0):
        super().__init__(config)
        self.drain, self.grace = drain, grace

    async def shutdown(self, sockets=None) -> None:
        if self.drain is not None:
            await asyncio.to_thread(self.drain, self.grace, lambda: self.force_exit)
        await super().shutdown(sockets=sockets)


class ServerThread:
    """A server for `app` on 127.0.0.1 from a background thread (tests, benchmarks, the web demo's
    self-check); `with ServerThread(app) as url:` stops it on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **guard):
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        engine = getattr(app.state, "engine", None)
        self.server = GracefulServer(uvicorn_config(app, host, port, ConnectionGuard(**guard)),
                                     drain=engine.drain if engine is not None else None, grace=0.0)
        self.thread = None

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self.url
            if not self.thread.is_alive():
                raise RuntimeError(f"the server at {self.url} failed to start")
            time.sleep(0.05)
        raise RuntimeError(f"the server at {self.url} did not start in 30 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
