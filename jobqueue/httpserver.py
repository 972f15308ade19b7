"""uvicorn in a background thread: the emulator in tests and the daemon's `--listen` server.

The daemon's server is exposed to whatever can reach it, so it can bound what a client holds:
`read_timeout` closes a connection whose request headers, or then whose body, take longer than
that to arrive (a slow-loris client trickling a byte at a time), and `max_connections` answers
503 to requests beyond that many open connections. The emulator runs without either: it takes
uploads of hundreds of megabytes.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    log_level: str = "warning",
    *,
    read_timeout: float | None = None,
    max_connections: int | None = None,
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        # Never behind a proxy that jobqueue knows of: no header rewriting.
        proxy_headers=False,
        timeout_keep_alive=30 if read_timeout is None else max(1, min(30, int(read_timeout))),
        http=H11Protocol if read_timeout is None else guarded_protocol(read_timeout),
        limit_concurrency=max_connections,
    )


def guarded_protocol(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request is not received in time.

    A request has `read_timeout` seconds from its first byte (or from the connection, for the
    first one) until its headers are in, then `read_timeout` again until its body is in. uvicorn
    itself only times out idle keep-alive connections.
    """

    class GuardedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None
        _phase: object = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _watch(self) -> None:
            """Arm the timer for the phase the client is in; disarm it once the request is in."""
            phase = self.conn.their_state
            if phase is h11.IDLE and self._phase is h11.IDLE and self._read_timer is not None:
                return  # still waiting for the same request's headers
            if phase is h11.SEND_BODY and self._phase is h11.SEND_BODY:
                return  # still waiting for the same request's body
            self._disarm()
            self._phase = phase
            if phase in (h11.IDLE, h11.SEND_BODY):
                self._read_timer = self.loop.call_later(read_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            phase = "headers" if self._phase is h11.IDLE else "body"
            self.logger.warning(
                "request %s not received within %gs; connection closed", phase, read_timeout
            )
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()  # the next request on this connection gets its own time

    return GuardedH11Protocol


class ListenError(OSError):
    """The address cannot be listened on; the message is fit to show as is."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or ListenError saying why not in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = {
            errno.EADDRINUSE: "the address is already in use",
            errno.EADDRNOTAVAIL: "the address is not one of this machine's",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


class BackgroundServer:
    """Serve an ASGI app on `host:port` (0: any free port) from a daemon thread.

    `sock` serves an already bound socket instead (see `bind_socket`); `read_timeout` and
    `max_connections` as in `uvicorn_config`.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        read_timeout: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.host = host
        config = uvicorn_config(
            app, host, port, read_timeout=read_timeout, max_connections=max_connections
        )
        self._server = uvicorn.Server(config)
        # uvicorn listens to signals only from the main thread: the owning process keeps its own.
        sockets = [sock] if sock is not None else None
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": sockets}, name="uvicorn", daemon=True
        )
        self.port = port

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.005)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
