"""`jobqueue run --listen`: OpenAI webhook ingest, /healthz and /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobqueue.emulator import EmulatorConfig, serve_in_thread
from jobqueue.hooks.signing import generate_secret, signed_headers
from jobqueue.remote import make_provider
from jobqueue.service.daemon import Daemon
from jobqueue.service.server import parse_address, serve_in_background
from tests.daemon_helpers import API_KEY, make_queue, wait_until
from tests.factories import chat_file

SECRET = generate_secret()


class AnswerAfterTheWebhook:
    """The remote client, but a create's answer comes back only once the daemon's server has
    received (and kept) the webhook saying that the new batch ended: the race of a webhook that
    arrives before the submitting daemon has committed the remote id, every time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.daemon: Daemon | None = None

    def create_batch(self, **kwargs: Any) -> Any:
        created = self.inner.create_batch(**kwargs)
        assert self.daemon is not None
        wait_until(lambda: self.daemon.stats.get("webhooks_deferred", 0) >= 1, timeout=20)
        return created

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def _listening(db_url: str, tmp_path: Path, *, late_answer: bool = False) -> Iterator[tuple]:
    import socket

    with socket.socket() as s:  # a free port for our server, known before the emulator starts
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = EmulatorConfig(
        time_scale=3600, seed=21, api_key=API_KEY,
        webhook_url=f"http://127.0.0.1:{port}/webhooks/openai", webhook_secret=SECRET,
    )  # fmt: skip
    with serve_in_thread(config) as em:
        jq = make_queue(db_url, tmp_path / "data", em.base_url, poll_interval=3600,
                        webhook_secret=SECRET)  # fmt: skip
        provider = AnswerAfterTheWebhook(make_provider(jq.settings)) if late_answer else None
        daemon = Daemon(jq.settings, jq.store, provider)  # type: ignore[arg-type]
        if provider is not None:
            provider.daemon = daemon
        server = serve_in_background(daemon, f"127.0.0.1:{port}")
        try:
            yield jq, daemon, server, em
        finally:
            daemon.stop()
            server.stop()
            jq.close()
            if provider is not None:
                provider.inner.close()


@pytest.fixture
def listening(db_url: str, tmp_path: Path) -> Iterator[tuple]:
    """A daemon polling only hourly, whose server receives the emulator's signed webhooks. The
    test starts the daemon (`daemon.start()`) once it has set up what must come first."""
    with _listening(db_url, tmp_path) as parts:
        yield parts


@pytest.fixture
def listening_late(db_url: str, tmp_path: Path) -> Iterator[tuple]:
    """The same, with the remote client wrapped in `AnswerAfterTheWebhook`."""
    with _listening(db_url, tmp_path, late_answer=True) as parts:
        yield parts


def test_openai_webhook_moves_a_batch_at_once(listening, tmp_path: Path) -> None:
    jq, daemon, _server, em = listening
    job = jq.submit(chat_file(tmp_path / "in.jsonl", 50), "/v1/chat/completions")
    daemon.start()
    job = jq.wait(job.id, timeout=60)
    assert job.status == "completed"
    assert daemon.stats.get("webhook_reconciles", 0) >= 1
    batch = job.batches[0]
    remote = next(b for b in em.emulator.batches() if b["id"] == batch.remote_id)
    completed = next(
        e for e in jq.events(job.id) if e.type == "batch.completed" and e.batch_id == batch.id
    )
    # Within two seconds of the remote completing (its times are whole seconds, hence + 1).
    assert completed.created_at.timestamp() - remote["completed_at"] < 3.0
    assert em.emulator.stats()["webhooks"]["sent"] >= 1


def test_a_webhook_that_comes_before_its_batch_is_known_is_kept(
    listening_late, tmp_path: Path
) -> None:
    """The remote finishes the batch and says so before the daemon has recorded its remote id:
    the webhook is kept, not lost, and reconciled as soon as the batch is adopted."""
    jq, daemon, _server, em = listening_late
    job = jq.submit(chat_file(tmp_path / "in.jsonl", 20), "/v1/chat/completions")
    daemon.start()
    job = jq.wait(job.id, timeout=60)
    assert job.status == "completed"
    assert daemon.stats["webhooks_deferred"] == 1
    assert daemon.stats["webhook_reconciles"] >= 1
    assert em.emulator.stats()["webhooks"]["sent"] >= 1
    assert not daemon.ctx.memo["webhooks"].since  # nothing left waiting


def _post(url: str, body: bytes, secret: str = SECRET, **kw) -> httpx.Response:
    headers = signed_headers(secret, "wh_test_1", body, **kw)
    return httpx.post(f"{url}/webhooks/openai", content=body, headers=headers, timeout=10)


def test_webhook_signatures_are_checked(listening) -> None:
    _jq, _daemon, server, _em = listening
    body = orjson.dumps(
        {"id": "evt_1", "object": "event", "type": "batch.completed", "created_at": 1,
         "data": {"id": "batch_unknown"}}
    )  # fmt: skip
    # Not known (yet): kept a while in case its submission commits shortly.
    assert _post(server.url, body).json() == {"batch": "batch_unknown", "outcome": "pending"}
    assert _post(server.url, body, secret=generate_secret()).status_code == 401
    assert _post(server.url, body, timestamp=int(time.time()) - 310).status_code == 401
    assert _post(server.url, body, timestamp=int(time.time()) + 310).status_code == 401
    tampered = httpx.post(
        f"{server.url}/webhooks/openai",
        content=body.replace(b"batch_unknown", b"batch_other"),
        headers=signed_headers(SECRET, "wh_test_2", body),
    )
    assert tampered.status_code == 401
    unsigned = httpx.post(f"{server.url}/webhooks/openai", content=body)
    assert unsigned.status_code == 401


def test_replayed_webhook_changes_nothing(listening, tmp_path: Path) -> None:
    jq, daemon, server, _em = listening
    job = jq.submit(chat_file(tmp_path / "in.jsonl", 10), "/v1/chat/completions")
    daemon.start()
    job = jq.wait(job.id, timeout=60)
    events_before = len(jq.events(job.id))
    body = orjson.dumps(
        {"id": "evt_2", "object": "event", "type": "batch.completed", "created_at": 1,
         "data": {"id": job.batches[0].remote_id}}
    )  # fmt: skip
    assert _post(server.url, body).json()["outcome"] == "unchanged"
    reconciles = daemon.stats.get("webhook_reconciles", 0)
    # The same signed message again: acknowledged (so the sender stops), not processed again.
    for _ in range(3):
        response = _post(server.url, body)
        assert response.status_code == 200
        assert response.json() == {"duplicate": True}
    assert daemon.stats.get("webhook_reconciles", 0) == reconciles
    # Another webhook id is another message: processed, and it moves nothing either.
    headers = signed_headers(SECRET, "wh_test_other", body)
    again = httpx.post(f"{server.url}/webhooks/openai", content=body, headers=headers)
    assert again.json()["outcome"] == "unchanged"
    assert daemon.stats.get("webhook_reconciles", 0) == reconciles + 1
    assert len(jq.events(job.id)) == events_before


def test_healthz_and_metrics_match_the_database(listening, tmp_path: Path) -> None:
    jq, daemon, server, _em = listening
    # Cancelled while no daemon runs, so before any could submit it.
    queued = jq.submit(chat_file(tmp_path / "in2.jsonl", 5), "/v1/chat/completions")
    jq.cancel(queued.id)
    job = jq.submit(chat_file(tmp_path / "in.jsonl", 30), "/v1/chat/completions",
                    max_batch_requests=10)  # fmt: skip
    daemon.start()
    jq.wait(job.id, timeout=60)
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("jobqueue_jobs", (("status", "completed"),))] == 1
    assert samples[("jobqueue_jobs", (("status", "cancelled"),))] == 1
    assert samples[("jobqueue_batches", (("status", "completed"),))] == 3
    assert samples[("jobqueue_batches", (("status", "cancelled"),))] == 1
    assert samples[("jobqueue_requests", (("outcome", "succeeded"),))] == 30
    assert samples[("jobqueue_requests", (("outcome", "failed"),))] == 5
    assert samples[("jobqueue_requests", (("outcome", "pending"),))] == 0
    assert samples[("jobqueue_reconcile_calls_total", ())] >= 1
    assert samples[("jobqueue_orphan_batches_total", ())] == 0
    assert samples[("jobqueue_leader", ())] == 1  # the only daemon leads
    assert httpx.get(f"{server.url}/healthz").json()["leader"] is True
    daemon.stop()
    assert httpx.get(f"{server.url}/healthz").status_code == 503


def test_listen_address_parsing() -> None:
    assert parse_address("127.0.0.1:8089") == ("127.0.0.1", 8089)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    assert parse_address(":9000") == ("127.0.0.1", 9000)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("localhost")
