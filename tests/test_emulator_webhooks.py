"""Outgoing webhooks: Standard Webhooks signatures the official SDK accepts, with retries."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest

from jobqueue.emulator import Emulator, EmulatorConfig
from jobqueue.emulator.webhooks import sign
from tests.test_emulator_helpers import add_input, chat_line, create

SECRET = "whsec_RdvaYFYUXuIFuEbvZHwMfYFhUf7aMYjYcmM24+Aj40c="


def test_signature_matches_the_sdk_test_vector() -> None:
    body = (
        '{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", '
        '"created_at": 1750861210, "type": "response.completed", "data": {"id": "resp_123"}}'
    )
    assert (
        sign(SECRET, "wh_685c059ae39c8190af8c71ed1022a24d", 1750861210, body)
        == "v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY="
    )
    assert sign("plain-secret", "wh_1", 1, "{}").startswith("v1,")


class Receiver:
    """A tiny HTTP server recording deliveries; answers 500 to the first `fail_first`."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = 500 if len(receiver.received) < receiver.fail_first else 200
                receiver.received.append(
                    ({k.lower(): v for k, v in self.headers.items()}, body, status)
                )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ok(self) -> list[tuple[dict[str, str], bytes, int]]:
        return [r for r in self.received if r[2] == 200]

    def wait(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ok()) < count:
            assert time.monotonic() < deadline, f"only {len(self.ok())} of {count} webhooks"
            time.sleep(0.005)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_each_terminal_status_is_posted_and_the_sdk_unwraps_it(receiver: Receiver) -> None:
    config = EmulatorConfig(
        time_scale=1.0,
        webhook_url=receiver.url,
        webhook_secret=SECRET,
        requests_per_minute=60.0,
        completion_window_seconds=120.0,
    )
    with Emulator(config) as em:
        file_id = add_input(em, [chat_line(i) for i in range(100)])
        completed = create(em, add_input(em, [chat_line(1)]))
        failed = create(em, "file-missing")
        cancelled = create(em, file_id)
        expired = create(em, file_id)
        em.advance(70)
        em.cancel_batch(cancelled["id"])
        em.advance(600)
        receiver.wait(4)
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9/v1", webhook_secret=SECRET)
    events = {}
    for headers, body, _ in receiver.ok():
        event = client.webhooks.unwrap(body, headers)  # verifies the signature and timestamp
        events[event.data.id] = event.type
        assert event.id.startswith("evt_") and event.object == "event"
        assert headers["webhook-id"].startswith("wh_")
    assert events == {
        completed["id"]: "batch.completed",
        failed["id"]: "batch.failed",
        cancelled["id"]: "batch.cancelled",
        expired["id"]: "batch.expired",
    }
    with pytest.raises(openai.InvalidWebhookSignatureError):
        headers, body, _ = receiver.ok()[0]
        client.webhooks.unwrap(body + b" ", headers)


def test_failed_deliveries_are_retried_with_the_same_webhook_id() -> None:
    receiver = Receiver(fail_first=2)
    try:
        config = EmulatorConfig(time_scale=10_000, webhook_url=receiver.url, webhook_secret=SECRET)
        with Emulator(config) as em:
            em.webhooks.backoff = 0.01  # type: ignore[union-attr]
            create(em, add_input(em, [chat_line(1)]))
            receiver.wait(1)
            assert em.webhooks is not None and em.webhooks.wait_idle(10)
            stats = em.stats()["webhooks"]
        assert [r[2] for r in receiver.received] == [500, 500, 200]
        assert len({r[0]["webhook-id"] for r in receiver.received}) == 1
        assert stats == {"sent": 1, "failed_attempts": 2, "given_up": 0}
    finally:
        receiver.close()


def test_an_unreachable_receiver_never_blocks_the_api() -> None:
    config = EmulatorConfig(
        time_scale=10_000,
        webhook_url="http://127.0.0.1:9/unreachable",
        webhook_secret=SECRET,
        webhook_attempts=2,
    )
    with Emulator(config) as em:
        em.webhooks.backoff = 0.01  # type: ignore[union-attr]
        started = time.perf_counter()
        for _ in range(20):
            create(em, add_input(em, [chat_line(1)]))
        em.advance(3600)
        assert time.perf_counter() - started < 5
        assert em.webhooks is not None and em.webhooks.wait_idle(10)
        assert em.stats()["webhooks"]["given_up"] == 20
