"""Hook sinks: patterns, Python callables, shell commands, and signed webhooks (mock + loopback)."""

from __future__ import annotations

import asyncio
import os
import random
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from jobqueue.hooks import (
    CommandSink,
    DeliveryError,
    PythonSink,
    Sink,
    WebhookSink,
    WebhookVerificationError,
    backoff,
    build_sinks,
    close_sinks,
    event_body,
    generate_secret,
    matches,
    sink_matches,
    verify,
)
from jobqueue.settings import HookConfig

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")


def make_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": "evt_0123456789abcdef",
        "type": "job.completed",
        "created_at": 1750861210,
        "job_id": "job_abc",
        "batch_id": "bat_xyz",
        "from": "running",
        "to": "completed",
        "data": {"request_counts": {"total": 3, "completed": 3, "failed": 0}, "note": "é"},
    }
    event.update(overrides)
    return event


@pytest.fixture
def event() -> dict[str, Any]:
    return make_event()


# --- event bodies and backoff -----------------------------------------------------------------


def test_event_body_is_canonical_json(event: dict[str, Any]) -> None:
    body = event_body(event)
    assert orjson.loads(body) == event
    assert body == event_body(dict(reversed(list(event.items()))))  # key order does not matter
    assert body.startswith(b'{"batch_id":"bat_xyz","created_at":')
    assert "é".encode() in body  # UTF-8, not \\u escapes


def test_backoff_full_jitter_bounds() -> None:
    class Top:
        def random(self) -> float:
            return 0.999999

    top = Top()
    assert backoff(1, rng=top) == pytest.approx(1.0, rel=1e-3)
    assert backoff(2, rng=top) == pytest.approx(2.0, rel=1e-3)
    assert backoff(5, base=0.5, rng=top) == pytest.approx(8.0, rel=1e-3)
    assert backoff(20, rng=top) == pytest.approx(300.0, rel=1e-3)  # capped
    assert backoff(10_000, rng=top) == pytest.approx(300.0, rel=1e-3)  # no overflow
    assert backoff(0, rng=top) == pytest.approx(1.0, rel=1e-3)  # clamped to the first attempt
    rng = random.Random(7)
    delays = [backoff(6, rng=rng) for _ in range(500)]
    assert all(0.0 <= d < 32.0 for d in delays)
    assert min(delays) < 4.0 and max(delays) > 28.0  # spread across the whole window
    assert 0.0 <= backoff(3) < 4.0  # the module-level `random` works as rng


# --- patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "event_type", "expected"),
    [
        ("*", "job.completed", True),
        ("*", "batch.overdue", True),
        ("job.*", "job.completed", True),
        ("job.*", "job.failed", True),
        ("job.*", "batch.completed", False),
        ("job.*", "job", False),
        ("job.*", "jobs.completed", False),
        ("batch.completed", "batch.completed", True),
        ("batch.completed", "batch.completed_late", False),
        ("batch.completed", "Batch.Completed", False),
        ("batch.*ed", "batch.expired", True),
        ("batch.*ed", "batch.stuck", False),
        ("batch.[cf]*", "batch.failed", True),
        ("batch.[cf]*", "batch.expired", False),
        ("job.?ailed", "job.failed", True),
        (["batch.completed", "job.*"], "job.cancelled", True),
        (["batch.completed", "job.*"], "batch.completed", True),
        (["batch.completed", "job.*"], "batch.failed", False),
        ([], "job.completed", False),
        ("", "job.completed", False),
        ((p for p in ["x", "*"]), "anything", True),
    ],
)
def test_patterns(patterns: str | list[str], event_type: str, expected: bool) -> None:
    assert matches(patterns, event_type) is expected


def test_sink_matches_uses_the_sink_patterns() -> None:
    sink = PythonSink(lambda e: None, ["batch.completed", "job.*"])
    assert sink_matches(sink, "job.failed")
    assert sink_matches(sink, "batch.completed")
    assert not sink_matches(sink, "batch.failed")
    assert PythonSink(lambda e: None, "batch.*").patterns == ["batch.*"]


# --- PythonSink -------------------------------------------------------------------------------


def test_python_sink_success(event: dict[str, Any]) -> None:
    received: list[dict[str, Any]] = []

    def on_event(e: dict[str, Any]) -> None:
        received.append(e)
        e["data"]["mutated"] = True  # must not leak into what other sinks see

    sink = PythonSink(on_event, "job.*")
    assert isinstance(sink, Sink)
    assert sink.name.startswith("python:") and "on_event" in sink.name
    assert sink.max_attempts == 8 and sink.timeout == 10.0
    sink.deliver(event, event_body(event))
    assert received[0]["id"] == event["id"]
    assert "mutated" not in event["data"]
    assert PythonSink(on_event, "*", name="mine").name == "mine"


def test_python_sink_failure(event: dict[str, Any]) -> None:
    def broken(e: dict[str, Any]) -> None:
        raise KeyError("missing thing")

    sink = PythonSink(broken, "*")
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert exc.value.retryable
    assert str(exc.value) == "KeyError: 'missing thing'"
    assert isinstance(exc.value.__cause__, KeyError)


def test_python_sink_passes_delivery_error_through(event: dict[str, Any]) -> None:
    def refuses(e: dict[str, Any]) -> None:
        raise DeliveryError("not for me", retryable=False)

    with pytest.raises(DeliveryError) as exc:
        PythonSink(refuses, "*").deliver(event, event_body(event))
    assert not exc.value.retryable and exc.value.message == "not for me"


# --- CommandSink ------------------------------------------------------------------------------

ENV_DUMP = (
    'printf "%s\\n" "type=$JOBQUEUE_EVENT_TYPE" "id=$JOBQUEUE_EVENT_ID" "job=$JOBQUEUE_JOB_ID" '
    '"batch=${JOBQUEUE_BATCH_ID-<unset>}" "extra=$EXTRA_VAR" "path=${PATH:+set}"'
)


def test_command_sink_stdin_and_environment(tmp_path: Path, event: dict[str, Any]) -> None:
    stdin_file, env_file = tmp_path / "stdin.json", tmp_path / "env.txt"
    command = f"cat > {shlex.quote(str(stdin_file))}; {ENV_DUMP} > {shlex.quote(str(env_file))}"
    sink = CommandSink(command, "job.*", timeout=5, env={"EXTRA_VAR": "42"})
    assert isinstance(sink, Sink)
    body = event_body(event)
    sink.deliver(event, body)
    assert stdin_file.read_bytes() == body
    assert env_file.read_text().splitlines() == [
        "type=job.completed",
        f"id={event['id']}",
        "job=job_abc",
        "batch=bat_xyz",
        "extra=42",
        "path=set",  # PATH is one of the few variables passed on
    ]


def test_command_sink_without_batch_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQUEUE_BATCH_ID", "stale-from-daemon")
    env_file = tmp_path / "env.txt"
    sink = CommandSink(f"{ENV_DUMP} > {shlex.quote(str(env_file))}", "*")
    event = make_event(type="job.submitted", batch_id=None)
    sink.deliver(event, event_body(event))
    assert "batch=<unset>" in env_file.read_text().splitlines()


def test_command_sink_failing_exit_code(event: dict[str, Any]) -> None:
    sink = CommandSink("echo first line >&2; echo 'boom: disk full' >&2; exit 3", "*")
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert exc.value.retryable
    assert str(exc.value).startswith("exit code 3:")
    assert "boom: disk full" in str(exc.value)


def test_command_sink_stderr_tail_is_bounded(event: dict[str, Any]) -> None:
    sink = CommandSink("head -c 100000 /dev/zero | tr '\\0' x >&2; echo END >&2; exit 1", "*")
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert len(str(exc.value)) < 600 and str(exc.value).endswith("END")


def test_command_sink_ignoring_stdin_is_fine() -> None:
    event = make_event(data={"blob": "x" * 1_000_000})  # larger than a pipe buffer
    CommandSink("true", "*").deliver(event, event_body(event))


def _live_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


@pytest.mark.timeout(20)
def test_command_sink_timeout_kills_the_process_group(
    tmp_path: Path, event: dict[str, Any]
) -> None:
    pid_file = tmp_path / "pgid"
    # A background child as well as the foreground one: both must die.
    command = f"echo $$ > {shlex.quote(str(pid_file))}; sleep 30 & sleep 30"
    sink = CommandSink(command, "*", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    elapsed = time.monotonic() - started
    assert str(exc.value) == "timed out after 0.5s"
    assert exc.value.retryable
    assert elapsed < 3.0
    pgid = int(pid_file.read_text())
    deadline = time.monotonic() + 3.0
    while _live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_members(pgid) == []


@pytest.mark.timeout(20)
def test_command_sink_plain_sleep_times_out_quickly(event: dict[str, Any]) -> None:
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"timed out after 0\.5s"):
        CommandSink("sleep 30", "*", timeout=0.5).deliver(event, event_body(event))
    assert time.monotonic() - started < 3.0


def test_command_sink_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        CommandSink("  ", "*")
    with pytest.raises(ValueError):
        CommandSink("true", "*", timeout=0)
    with pytest.raises(ValueError):
        CommandSink("true", "*", max_attempts=0)


# --- WebhookSink with a mock transport --------------------------------------------------------


class Recorder:
    def __init__(self, respond: Any = None) -> None:
        self.requests: list[httpx.Request] = []
        self.respond = respond or (lambda request: httpx.Response(204))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.respond(request)


def mock_sink(
    respond: Any = None, secret: str | None = "generate", **kwargs: Any
) -> tuple[WebhookSink, Recorder, str | None]:
    recorder = Recorder(respond)
    if secret == "generate":
        secret = generate_secret()
    sink = WebhookSink(
        "https://hooks.example.com/in?token=t0ps3cret",
        secret,
        "*",
        transport=httpx.MockTransport(recorder),
        **kwargs,
    )
    return sink, recorder, secret


def test_webhook_sink_posts_signed_body(event: dict[str, Any]) -> None:
    sink, recorder, secret = mock_sink()
    assert secret is not None
    assert isinstance(sink, Sink)
    body = event_body(event)
    sink.deliver(event, body)
    (request,) = recorder.requests
    assert request.method == "POST"
    assert request.content == body
    assert request.headers["webhook-id"] == event["id"]
    assert request.headers["content-type"] == "application/json"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    verify(secret, request.headers, request.content)
    with pytest.raises(WebhookVerificationError):
        verify(generate_secret(), request.headers, request.content)
    sink.close()


def test_webhook_sink_name_and_repr_hide_secrets() -> None:
    sink, _, secret = mock_sink()
    assert secret is not None
    assert sink.name == "webhook:https://hooks.example.com"
    assert secret not in repr(sink) and "t0ps3cret" not in repr(sink)
    assert secret not in repr(vars(sink).get("name"))
    sink.close()


def test_webhook_sink_fresh_timestamp_each_attempt(event: dict[str, Any]) -> None:
    attempts = iter([503, 200])
    clock = iter([1_800_000_000.0, 1_800_000_090.0])
    sink, recorder, secret = mock_sink(
        lambda r: httpx.Response(next(attempts)), clock=lambda: next(clock)
    )
    assert secret is not None
    body = event_body(event)
    with pytest.raises(DeliveryError):
        sink.deliver(event, body)
    sink.deliver(event, body)
    first, second = recorder.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == event["id"]
    assert first.headers["webhook-timestamp"] == "1800000000"
    assert second.headers["webhook-timestamp"] == "1800000090"
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]
    verify(secret, second.headers, second.content, now=1_800_000_090)
    sink.close()


def test_webhook_sink_without_secret_is_unsigned(event: dict[str, Any]) -> None:
    sink, recorder, _ = mock_sink(secret=None)
    sink.deliver(event, event_body(event))
    assert "webhook-signature" not in recorder.requests[0].headers
    assert recorder.requests[0].headers["webhook-id"] == event["id"]
    sink.close()


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (502, True), (503, True), (408, True), (409, True), (429, True),
     (400, False), (401, False), (404, False), (410, False), (422, False), (301, True)],
)  # fmt: skip
def test_webhook_sink_non_2xx_fails(event: dict[str, Any], status: int, retryable: bool) -> None:
    sink, _, _ = mock_sink(lambda r: httpx.Response(status, text="  receiver\n says   no  "))
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert str(exc.value) == f"HTTP {status}: receiver says no"
    assert exc.value.retryable is retryable
    assert "t0ps3cret" not in str(exc.value)
    sink.close()


def test_webhook_sink_any_2xx_succeeds(event: dict[str, Any]) -> None:
    for status in (200, 201, 202, 204, 299):
        sink, _, _ = mock_sink(lambda r, s=status: httpx.Response(s, text="ok"))
        sink.deliver(event, event_body(event))
        sink.close()


def test_webhook_sink_retry_after_and_bounded_excerpt(event: dict[str, Any]) -> None:
    sink, _, _ = mock_sink(
        lambda r: httpx.Response(429, headers={"retry-after": "17"}, text="y" * 100_000)
    )
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert exc.value.retry_after == 17.0
    assert len(str(exc.value)) < 250
    sink.close()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (httpx.ReadTimeout("read timed out"), "timed out after 10s (ReadTimeout)"),
        (httpx.ConnectTimeout("connect timed out"), "timed out after 10s (ConnectTimeout)"),
        (httpx.ConnectError("[Errno 111] Connection refused"), "ConnectError: [Errno 111]"),
        (httpx.RemoteProtocolError("server hung up"), "RemoteProtocolError: server hung up"),
    ],
)
def test_webhook_sink_transport_errors(
    event: dict[str, Any], error: Exception, expected: str
) -> None:
    def raise_(request: httpx.Request) -> httpx.Response:
        raise error

    sink, _, _ = mock_sink(raise_)
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert str(exc.value).startswith(expected)
    assert exc.value.retryable
    sink.close()


def test_webhook_sink_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookSink("ftp://example.com/x", None, "*")
    with pytest.raises(ValueError, match="http"):
        WebhookSink("/relative/path", None, "*")
    with pytest.raises(ValueError) as exc:
        WebhookSink("https://example.com/x", "whsec_%%%notbase64", "*")
    assert "%%%notbase64" not in str(exc.value)


def test_webhook_sink_event_without_id_is_not_retryable() -> None:
    sink, recorder, _ = mock_sink()
    event = make_event(id=None)
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert not exc.value.retryable and recorder.requests == []
    sink.close()


# --- WebhookSink against a real loopback receiver ---------------------------------------------

RECEIVER_SECRET = generate_secret()


class Receiver:
    def __init__(self) -> None:
        self.verified: list[dict[str, Any]] = []
        self.rejected: list[str] = []
        app = Starlette(
            routes=[
                Route("/hook", self.hook, methods=["POST"]),
                Route("/fail", self.fail, methods=["POST"]),
                Route("/slow", self.slow, methods=["POST"]),
            ]
        )
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        try:
            verify(RECEIVER_SECRET, request.headers, body)
        except WebhookVerificationError as exc:
            self.rejected.append(exc.reason)
            return PlainTextResponse(exc.reason, status_code=400)
        self.verified.append(orjson.loads(body))
        return JSONResponse({"ok": True})

    async def fail(self, request: Request) -> Response:
        await request.body()
        return PlainTextResponse("database unavailable", status_code=503)

    async def slow(self, request: Request) -> Response:
        await request.body()
        await asyncio.sleep(2)
        return Response(status_code=204)

    def __enter__(self) -> Receiver:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("receiver did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.mark.timeout(30)
def test_webhook_loopback_verified_by_receiver(receiver: Receiver, event: dict[str, Any]) -> None:
    sink = WebhookSink(receiver.url("/hook"), RECEIVER_SECRET, "*", timeout=5)
    sink.deliver(event, event_body(event))
    sink.deliver(make_event(id="evt_second"), event_body(make_event(id="evt_second")))
    assert [e["id"] for e in receiver.verified[-2:]] == [event["id"], "evt_second"]
    assert receiver.verified[-2] == event
    sink.close()


@pytest.mark.timeout(30)
def test_webhook_loopback_wrong_secret_is_rejected(
    receiver: Receiver, event: dict[str, Any]
) -> None:
    sink = WebhookSink(receiver.url("/hook"), generate_secret(), "*", timeout=5)
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert str(exc.value) == "HTTP 400: no matching v1 signature in webhook-signature"
    assert not exc.value.retryable
    sink.close()


@pytest.mark.timeout(30)
def test_webhook_loopback_non_2xx(receiver: Receiver, event: dict[str, Any]) -> None:
    sink = WebhookSink(receiver.url("/fail"), RECEIVER_SECRET, "*", timeout=5)
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert str(exc.value) == "HTTP 503: database unavailable"
    assert exc.value.retryable
    sink.close()


@pytest.mark.timeout(30)
def test_webhook_loopback_timeout(receiver: Receiver, event: dict[str, Any]) -> None:
    sink = WebhookSink(receiver.url("/slow"), RECEIVER_SECRET, "*", timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DeliveryError) as exc:
        sink.deliver(event, event_body(event))
    assert time.monotonic() - started < 1.5
    assert str(exc.value) == "timed out after 0.3s (ReadTimeout)"
    assert exc.value.retryable
    sink.close()


@pytest.mark.timeout(30)
def test_webhook_loopback_connection_refused(event: dict[str, Any]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        sink = WebhookSink(f"http://127.0.0.1:{port}/hook", None, "*", timeout=2)
        with pytest.raises(DeliveryError, match="ConnectError") as exc:
            sink.deliver(event, event_body(event))
        assert exc.value.retryable
        sink.close()


# --- build_sinks ------------------------------------------------------------------------------


def test_build_sinks_from_config(tmp_path: Path) -> None:
    secret = generate_secret()
    configs = [
        HookConfig(command="cat > /dev/null", events="job.*", timeout=3, max_attempts=2),
        HookConfig(url="https://example.com/hook", secret=secret, events=["batch.completed"]),
        HookConfig(url="https://example.com/other", name="ops", events=["*"]),
    ]
    sinks = build_sinks(configs)
    try:
        command, hook, ops = sinks
        assert isinstance(command, CommandSink)
        assert command.name == configs[0].sink_name
        # Names never spell out a command's arguments or a URL's path: either may hold a token.
        assert command.name.startswith("command:cat#")
        assert configs[1].sink_name.startswith("webhook:example.com#")
        assert "/hook" not in configs[1].sink_name
        assert command.patterns == ["job.*"]
        assert (command.timeout, command.max_attempts) == (3, 2)
        assert isinstance(hook, WebhookSink)
        assert hook.name == configs[1].sink_name
        assert hook.patterns == ["batch.completed"]
        assert (hook.timeout, hook.max_attempts) == (10.0, 8)
        assert isinstance(ops, WebhookSink) and ops.name == "ops"
        assert all(isinstance(s, Sink) for s in sinks)
        assert secret not in repr(sinks)
        assert [s.name for s in sinks if matches(s.patterns, "batch.completed")] == [
            configs[1].sink_name,
            "ops",
        ]
    finally:
        close_sinks(sinks)
    assert build_sinks([]) == []


def test_build_sinks_rejects_duplicate_names_and_bad_secrets() -> None:
    with pytest.raises(ValueError, match=r"hooks\[1\] has the same name as hooks\[0\]"):
        build_sinks([HookConfig(command="true"), HookConfig(command="true", events="job.*")])
    bad = "whsec_%%%"
    with pytest.raises(ValueError, match=r"hooks\[1\]") as exc:
        build_sinks(
            [HookConfig(url="https://a.example/x"), HookConfig(url="https://b/x", secret=bad)]
        )
    assert bad not in str(exc.value)
