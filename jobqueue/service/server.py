"""`jobqueue run --listen HOST:PORT`: OpenAI webhook ingest, health and Prometheus metrics.

- `POST /webhooks/openai` verifies the Standard Webhooks signature with `OPENAI_WEBHOOK_SECRET`
  (401 when missing, tampered, or more than 300 s old or ahead), then reconciles that batch at
  once. An unknown batch is acknowledged and ignored; a replayed event changes nothing, because
  observations only ever move a batch forward.
- `GET /healthz`: 200 when the database answers and the scheduler runs, 503 otherwise.
- `GET /metrics`: Prometheus text, computed from the database at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from jobqueue.core.states import BATCH_MACHINE, BatchStatus, JobStatus
from jobqueue.duties.webhook import reconcile_batch_by_remote_id
from jobqueue.hooks.signing import WebhookVerificationError, verify
from jobqueue.httpserver import BackgroundServer
from jobqueue.logs import get_logger
from jobqueue.store.metrics import MetricCounts, counts_for_metrics

if TYPE_CHECKING:
    from jobqueue.service.daemon import Daemon

log = get_logger("jobqueue.service.server")
BATCH_EVENTS = frozenset({"batch.completed", "batch.failed", "batch.cancelled", "batch.expired"})


def create_server_app(daemon: Daemon) -> Starlette:
    registry = CollectorRegistry()
    registry.register(MetricsCollector(daemon))

    async def openai_webhook(request: Request) -> Response:
        body = await request.body()
        secret = daemon.settings.webhook_secret
        if secret is None:
            log.error("webhook refused: OPENAI_WEBHOOK_SECRET is not set")
            return JSONResponse({"error": "webhook secret not configured"}, status_code=401)
        try:
            verify(secret.get_secret_value(), request.headers, body)
        except WebhookVerificationError as exc:
            log.warning("webhook refused", reason=exc.reason)
            return JSONResponse({"error": exc.reason}, status_code=401)
        try:
            event = orjson.loads(body)
            event_type = event["type"]
            remote_id = (event.get("data") or {}).get("id")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return JSONResponse({"error": "not an event"}, status_code=400)
        if event_type not in BATCH_EVENTS or not isinstance(remote_id, str):
            return JSONResponse({"ignored": True})
        outcome = await run_in_threadpool(reconcile_batch_by_remote_id, daemon.ctx, remote_id)
        return JSONResponse({"batch": remote_id, "outcome": outcome})

    async def healthz(_request: Request) -> Response:
        healthy = await run_in_threadpool(daemon.healthy)
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy", "duties": daemon.duty_states()},
            status_code=200 if healthy else 503,
        )

    async def metrics(_request: Request) -> Response:
        text = await run_in_threadpool(generate_latest, registry)
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/webhooks/openai", openai_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


class MetricsCollector(Collector):
    """Reads the database at scrape time, so every daemon reports the same truth."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        store = self.daemon.store
        with store.read() as conn:
            counts = counts_for_metrics(conn, [sink.name for sink in self.daemon.sinks])
        jobs, batches = counts.jobs, counts.batches
        g = GaugeMetricFamily("jobqueue_jobs", "Jobs by status.", labels=["status"])
        for job_status in JobStatus:
            g.add_metric([job_status.value], jobs.get(job_status.value, 0))
        yield g
        g = GaugeMetricFamily("jobqueue_batches", "Batches by status.", labels=["status"])
        for batch_status in BatchStatus:
            g.add_metric([batch_status.value], batches.get(batch_status.value, 0))
        yield g
        succeeded, failed = counts.requests_succeeded, counts.requests_failed
        g = GaugeMetricFamily("jobqueue_requests", "Requests by outcome.", labels=["outcome"])
        g.add_metric(["succeeded"], succeeded)
        g.add_metric(["failed"], failed)
        g.add_metric(["pending"], counts.requests_total - succeeded - failed)
        yield g
        for name, help_text, value in _delivery_counts(counts):
            g = GaugeMetricFamily(name, help_text)
            g.add_metric([], value)
            yield g
        stats = self.daemon.stats
        for name, help_text, key in [
            ("jobqueue_reconcile_calls", "Remote calls made by reconcile.", "reconcile_calls"),
            ("jobqueue_reconcile_cycles", "Reconcile cycles run.", "reconcile_cycles"),
            ("jobqueue_reconcile_seconds", "Seconds spent reconciling.", "reconcile_seconds"),
            (
                "jobqueue_webhook_reconciles",
                "Batches reconciled from a webhook.",
                "webhook_reconciles",
            ),
            ("jobqueue_collected_bytes", "Result bytes downloaded.", "collected_bytes"),
        ]:
            c = CounterMetricFamily(name, help_text)
            c.add_metric([], float(stats.get(key, 0)))
            yield c
        c = CounterMetricFamily(
            "jobqueue_refused_transitions", "Illegal or stale transitions refused."
        )
        c.add_metric([], float(BATCH_MACHINE.refused_total()))
        yield c
        runs = CounterMetricFamily("jobqueue_duty_runs", "Duty runs.", labels=["duty"])
        errors = CounterMetricFamily(
            "jobqueue_duty_errors", "Duty runs that failed.", labels=["duty"]
        )
        for duty, state in self.daemon.duty_states().items():
            runs.add_metric([duty], state["runs"])
            errors.add_metric([duty], state["errors"])
        yield runs
        yield errors


def _delivery_counts(counts: MetricCounts) -> list[tuple[str, str, int]]:
    """Deliveries pending and dead, and events waiting in the outbox."""
    return [
        ("jobqueue_deliveries_pending", "Hook deliveries not yet made.", counts.deliveries_pending),
        ("jobqueue_deliveries_dead", "Hook deliveries given up on.", counts.deliveries_dead),
        (
            "jobqueue_outbox_waiting",
            "Events not yet handed to every sink of this daemon.",
            counts.outbox_waiting,
        ),
    ]


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve_in_background(daemon: Daemon, address: str) -> BackgroundServer:
    host, port = parse_address(address)
    server = BackgroundServer(create_server_app(daemon), host, port).start()
    log.info("listening", url=server.url)
    return server
