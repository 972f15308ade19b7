"""Hostile traffic to `jobqueue run --listen`: bodies too large or too slow, slow headers, too
many connections, replays, missing tokens, and every bad `--listen`, refused in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from jobqueue.cli.app import main
from jobqueue.hooks.signing import generate_secret, signed_headers
from jobqueue.service.daemon import Daemon
from jobqueue.service.server import SeenWebhooks, serve_in_background
from tests.daemon_helpers import API_KEY, make_queue

SECRET = generate_secret()
NOWHERE = "http://127.0.0.1:9/v1"  # no remote: these daemons have no work to send there
EVENT = orjson.dumps(
    {"id": "evt_1", "object": "event", "type": "batch.completed", "created_at": 1,
     "data": {"id": "batch_unknown"}}
)  # fmt: skip


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """`serve(**settings)` starts a daemon's server on a free loopback port; returns it."""
    started: list[tuple[Any, Any, Any]] = []

    def start(address: str = "127.0.0.1:0", **settings: Any) -> Any:
        settings.setdefault("webhook_secret", SECRET)
        jq = make_queue(f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "data", NOWHERE,
                        poll_interval=3600, **settings)  # fmt: skip
        daemon = Daemon(jq.settings, jq.store)
        server = serve_in_background(daemon, address)
        started.append((jq, daemon, server))
        return server

    yield start
    for jq, daemon, server in started:
        server.stop()
        daemon.stop()
        jq.close()


def _connect(server: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def _response_or_close(sock: socket.socket) -> bytes:
    """What the server sends before it closes (b"" when it just closed)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def _trickle(sock: socket.socket, data: bytes, every: float) -> int:
    """Send `data` a byte at a time; stop when the server has answered or closed. Returns how
    many bytes went out."""
    sock.settimeout(every)
    for sent, byte in enumerate(data):
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(65536, socket.MSG_PEEK) is not None:
                return sent + 1  # something (an answer, or EOF) is there
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent
    return len(data)


# -- bodies ---------------------------------------------------------------------------------


def test_a_body_declared_too_large_is_refused_before_it_is_read(serve) -> None:
    server = serve(webhook_max_bytes=4096)
    with _connect(server) as sock:
        sock.sendall(
            b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n" + b"{" * 1000
        )  # 1 KB of a declared 100 MB: the answer comes without waiting for the rest
        answer = _response_or_close(sock)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in answer.lower()


def test_a_chunked_body_is_counted_as_it_streams(serve) -> None:
    server = serve(webhook_max_bytes=4096)
    chunk = b"x" * 3000
    with _connect(server) as sock:
        sock.sendall(
            b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2  # 6000 bytes, then nothing more
        )
        answer = _response_or_close(sock)
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_a_body_within_the_limit_is_read_and_checked(serve) -> None:
    server = serve(webhook_max_bytes=4096)
    response = httpx.post(f"{server.url}/webhooks/openai", content=EVENT,
                          headers=signed_headers(SECRET, "wh_1", EVENT))  # fmt: skip
    assert response.json() == {"batch": "batch_unknown", "outcome": "pending"}
    big = b" " * 5000 + EVENT
    response = httpx.post(f"{server.url}/webhooks/openai", content=big,
                          headers=signed_headers(SECRET, "wh_2", big))  # fmt: skip
    assert response.status_code == 413


def test_a_body_trickled_in_is_cut_off(serve) -> None:
    server = serve(http_timeout=1.0)
    body = b" " * 200  # at a byte every 0.25 s this would take 50 s
    with _connect(server) as sock:
        sock.sendall(b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n")
        sent = _trickle(sock, body, every=0.25)
        answer = _response_or_close(sock)
    assert sent < len(body)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")


def test_headers_trickled_in_are_cut_off(serve) -> None:
    server = serve(http_timeout=1.0)
    headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Padding: " + b"p" * 200 + b"\r\n\r\n"
    with _connect(server) as sock:
        sent = _trickle(sock, headers, every=0.25)
        answer = _response_or_close(sock)
    assert sent < len(headers)
    assert answer == b""  # closed without an answer


def test_a_connection_that_sends_nothing_is_closed(serve) -> None:
    server = serve(http_timeout=1.0)
    with _connect(server) as sock:
        assert _response_or_close(sock) == b""


def test_connections_beyond_the_cap_get_503(serve) -> None:
    server = serve(http_max_connections=3, http_timeout=30.0)
    idle = [_connect(server) for _ in range(3)]
    try:
        time.sleep(0.2)  # let the server accept them
        response = httpx.get(f"{server.url}/metrics")
        assert response.status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/metrics").status_code == 503:
        assert time.monotonic() < deadline, "the server never freed the closed connections"
        time.sleep(0.05)


# -- replays --------------------------------------------------------------------------------


def test_a_signed_replay_is_acknowledged_not_processed(serve) -> None:
    server = serve()
    headers = signed_headers(SECRET, "wh_replayed", EVENT)
    first = httpx.post(f"{server.url}/webhooks/openai", content=EVENT, headers=headers)
    assert first.json()["outcome"] == "pending"
    for _ in range(3):
        again = httpx.post(f"{server.url}/webhooks/openai", content=EVENT, headers=headers)
        assert (again.status_code, again.json()) == (200, {"duplicate": True})
    # An unsigned or forged copy is still refused, not acknowledged.
    forged = {**headers, "webhook-signature": "v1,AAAA"}
    assert httpx.post(f"{server.url}/webhooks/openai", content=EVENT,
                      headers=forged).status_code == 401  # fmt: skip


def test_seen_webhooks_forget_after_the_window_and_stay_bounded() -> None:
    now = [1000.0]
    seen = SeenWebhooks(window=600, capacity=3, clock=lambda: now[0])
    assert seen.add("a") and not seen.add("a")
    now[0] += 599
    assert not seen.add("a")
    now[0] += 2
    assert seen.add("a")  # the window passed (the signature's timestamp refuses it by then)
    for name in "bcd":
        assert seen.add(name)
    assert seen.add("a")  # pushed out by capacity: memory stays bounded
    seen.forget("d")
    assert seen.add("d")


# -- the token ------------------------------------------------------------------------------


def test_metrics_token_guards_every_unsigned_route(serve, capsys) -> None:
    token = "metrics-token-canary-5f1e"
    server = serve(metrics_token=token)
    for path in ("/metrics", "/healthz", "/nowhere"):
        refused = httpx.get(f"{server.url}{path}")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        wrong = httpx.get(f"{server.url}{path}", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
    ok = httpx.get(f"{server.url}/metrics", headers={"authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and "jobqueue_jobs" in ok.text
    healthy = httpx.get(f"{server.url}/healthz", headers={"authorization": f"bearer {token}"})
    assert healthy.status_code in (200, 503)  # answered: the daemon itself is not started here
    # The webhook is signed instead: no token needed.
    signed = httpx.post(f"{server.url}/webhooks/openai", content=EVENT,
                        headers=signed_headers(SECRET, "wh_tok", EVENT))  # fmt: skip
    assert signed.status_code == 200
    out, err = capsys.readouterr()
    assert token not in out + err


def test_warning_when_bound_beyond_loopback_without_a_token(serve, capsys) -> None:
    serve("127.0.0.1:0")
    assert "without metrics_token" not in capsys.readouterr().err
    serve("0.0.0.0:0", metrics_token="t0k3n-for-the-test")
    assert "without metrics_token" not in capsys.readouterr().err
    serve("0.0.0.0:0")
    assert "without metrics_token" in capsys.readouterr().err


def test_warning_when_the_webhook_secret_is_missing(serve, capsys) -> None:
    server = serve(webhook_secret=None)
    assert "OPENAI_WEBHOOK_SECRET is not set" in capsys.readouterr().err
    refused = httpx.post(f"{server.url}/webhooks/openai", content=EVENT,
                         headers=signed_headers(SECRET, "wh_x", EVENT))  # fmt: skip
    assert refused.status_code == 401


# -- bad --listen ---------------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("notaport", "expected HOST:PORT, e.g. 127.0.0.1:8089"),
        ("20052", "expected HOST:PORT, e.g. 127.0.0.1:20052"),
        ("127.0.0.1:99999", "port 99999 is out of range"),
        ("127.0.0.1:http", "the port must be a number"),
        ("::1:8089", "an IPv6 address goes in brackets"),
        ("[nope]:8089", "is not an IPv6 address"),
        ("bad host:8089", "is not a host name or address"),
        ("nohost.invalid:8089", "cannot resolve"),
        ("192.0.2.1:8089", "is not one of this machine's"),
        ("BUSY", "already in use"),
    ],
)
def test_bad_listen_is_one_line_and_exit_2(
    address: str, expected: str, busy_port: int, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    address = address.replace("BUSY", f"127.0.0.1:{busy_port}")
    code = main(["--database-url", f"sqlite:///{tmp_path / 'q.db'}", "run", "--listen", address])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: --listen") and expected in lines[0], lines[0]


def test_bad_listen_in_the_environment_is_a_config_error(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("JOBQUEUE_LISTEN", "20052")
    code = main(["--database-url", f"sqlite:///{tmp_path / 'q.db'}", "status"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "error: invalid configuration: listen: '20052': expected HOST:PORT, e.g. 127.0.0.1:20052"
    ]


def test_run_without_an_api_key_is_one_line(tmp_path: Path, capsys) -> None:
    code = main(["--database-url", f"sqlite:///{tmp_path / 'q.db'}", "run", "--once"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "error: no API key for https://api.openai.com/v1: set OPENAI_API_KEY "
        "(under systemd, the credential openai_api_key)"
    ]


# -- memory under large bodies ----------------------------------------------------------------


def _vm(pid: int, field: str) -> int:
    """A `/proc/<pid>/status` figure in bytes (VmHWM: peak resident, VmRSS: resident now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _send_huge(port: int, size: int, chunked: bool, outcome: dict[str, Any]) -> None:
    """POST `size` bytes to the webhook, 1 MB at a time, until the server stops taking them."""
    block = b"x" * (1 << 20)
    head = b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\n"
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n\r\n"
    else:
        head += b"Content-Length: %d\r\n\r\n" % size
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(head)
            while sent < size:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        outcome["sent"] = sent
        try:
            outcome["answer"] = sock.recv(200)
        except (ConnectionResetError, TimeoutError):
            outcome["answer"] = b""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_eight_concurrent_100mb_bodies_keep_the_server_small(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBQUEUE_", "OPENAI_"))}
    env.update(
        JOBQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'q.db'}",
        JOBQUEUE_DATA_DIR=str(tmp_path / "data"),
        JOBQUEUE_BASE_URL=NOWHERE,
        JOBQUEUE_POLL_INTERVAL="3600",
        JOBQUEUE_LOG_LEVEL="warning",
        OPENAI_API_KEY=API_KEY,
        OPENAI_WEBHOOK_SECRET=SECRET,
    )
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobqueue", "run", "--listen", f"127.0.0.1:{port}"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        before = _vm(proc.pid, "VmRSS")
        outcomes: list[dict[str, Any]] = [{} for _ in range(8)]
        senders = [
            threading.Thread(target=_send_huge, args=(port, 100 << 20, i % 2 == 1, outcomes[i]))
            for i in range(8)
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        peak, after = _vm(proc.pid, "VmHWM"), _vm(proc.pid, "VmRSS")
        print(f"server RSS before {before >> 20} MB, peak {peak >> 20} MB, after {after >> 20} MB")
        assert peak < 200 << 20
        assert after < 200 << 20
        for outcome in outcomes:
            assert outcome["sent"] < 100 << 20  # refused long before the end
            assert outcome["answer"] == b"" or outcome["answer"].startswith(b"HTTP/1.1 413 ")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
