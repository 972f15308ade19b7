"""`jobqueue run --listen HOST:PORT`: OpenAI webhook ingest, health and Prometheus metrics.

- `POST /webhooks/openai` verifies the Standard Webhooks signature with `OPENAI_WEBHOOK_SECRET`
  (401 when missing, tampered, or more than 300 s old or ahead), then reconciles that batch at
  once. An unknown batch is acknowledged and ignored. A body over `webhook_max_bytes` is refused
  with 413 before more of it is read (by its Content-Length, else as it streams in), one not in
  within `http_timeout` with 408. A webhook id seen in the last ten minutes (twice the
  signature's tolerance, so a replay is refused by one check or the other) is acknowledged and
  not processed again.
- `GET /healthz`: 200 when the database answers and the scheduler runs, 503 otherwise.
- `GET /metrics`: Prometheus text, computed from the database at scrape time.

With `metrics_token` set, every route but the signed webhook wants `Authorization: Bearer
<token>` (401 otherwise). Bound beyond loopback without one, the server warns at start-up.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from jobqueue.core.costs import PriceTable, Usage
from jobqueue.core.states import BATCH_MACHINE, BatchStatus, JobStatus
from jobqueue.duties.webhook import reconcile_batch_by_remote_id
from jobqueue.hooks.signing import DEFAULT_TOLERANCE, WebhookVerificationError, verify
from jobqueue.httpserver import BackgroundServer, ListenError, bind_socket
from jobqueue.logs import get_logger
from jobqueue.settings import ConfigError, parse_listen_address
from jobqueue.store import costs
from jobqueue.store.metrics import MetricCounts, counts_for_metrics

if TYPE_CHECKING:
    from jobqueue.service.daemon import Daemon

log = get_logger("jobqueue.service.server")
BATCH_EVENTS = frozenset({"batch.completed", "batch.failed", "batch.cancelled", "batch.expired"})
WEBHOOK_PATH = "/webhooks/openai"
# A webhook id is remembered this long: a replay within the signature's tolerance either way
# is caught here, a later one by the timestamp check.
DEDUP_SECONDS = 2 * DEFAULT_TOLERANCE
DEDUP_CAPACITY = 10_000


class _BodyTooLarge(Exception):
    pass


class SeenWebhooks:
    """Webhook ids accepted in the last `window` seconds (at most `capacity`, oldest dropped
    first), kept as digests so a long id costs no more than a short one."""

    def __init__(
        self, window: float = DEDUP_SECONDS, capacity: int = DEDUP_CAPACITY, clock: Any = None
    ) -> None:
        self.window = window
        self.capacity = capacity
        self._clock = clock or time.monotonic
        self._until: OrderedDict[bytes, float] = OrderedDict()

    @staticmethod
    def _key(webhook_id: str) -> bytes:
        return hashlib.sha256(webhook_id.encode("utf-8", "surrogatepass")).digest()

    def add(self, webhook_id: str) -> bool:
        """Remember the id; False when it was already there (a replay)."""
        now = self._clock()
        while self._until:
            key, until = next(iter(self._until.items()))
            if until > now:
                break
            del self._until[key]
        key = self._key(webhook_id)
        if key in self._until:
            return False
        self._until[key] = now + self.window
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)
        return True

    def forget(self, webhook_id: str) -> None:
        """Let this id be processed again (its processing failed)."""
        self._until.pop(self._key(webhook_id), None)


def _refuse(status: int, message: str, *, close: bool = False) -> JSONResponse:
    # `close` when the body was not read to its end: the connection cannot carry another request.
    headers = {"connection": "close"} if close else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class RequireToken:
    """ASGI middleware: every HTTP request but those to `exempt` paths must carry
    `Authorization: Bearer <token>`. The token is compared in constant time, never logged."""

    def __init__(self, app: ASGIApp, token: str, exempt: frozenset[str]) -> None:
        self.app = app
        self._token = token.encode()
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        log.info("request refused: no valid bearer token", path=scope["path"][:200])
        response = JSONResponse(
            {"error": "unauthorized"},
            status_code=401,
            headers={"www-authenticate": 'Bearer realm="jobqueue"'},
        )
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    credentials.strip(), self._token
                )
        return False


def create_server_app(daemon: Daemon) -> Starlette:
    registry = CollectorRegistry()
    registry.register(MetricsCollector(daemon))
    settings = daemon.settings
    seen = SeenWebhooks()

    async def openai_webhook(request: Request) -> Response:
        secret = settings.webhook_secret
        if secret is None:
            log.error("webhook refused: OPENAI_WEBHOOK_SECRET is not set")
            return _refuse(401, "webhook secret not configured", close=True)
        limit = settings.webhook_max_bytes
        declared = request.headers.get("content-length")
        if declared is not None and not (declared.isascii() and declared.isdigit()):
            return _refuse(400, "bad content-length", close=True)
        if declared is not None and int(declared) > limit:
            log.warning("webhook refused: body too large", content_length=int(declared))
            return _refuse(413, f"body larger than {limit} bytes", close=True)
        try:
            body = await asyncio.wait_for(_read_body(request, limit), settings.http_timeout)
        except _BodyTooLarge:
            log.warning("webhook refused: body too large", limit=limit)
            return _refuse(413, f"body larger than {limit} bytes", close=True)
        except TimeoutError:
            log.warning("webhook refused: body not received in time", seconds=settings.http_timeout)
            return _refuse(408, "body not received in time", close=True)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        try:
            verify(secret.get_secret_value(), request.headers, body)
        except WebhookVerificationError as exc:
            log.warning("webhook refused", reason=exc.reason)
            return JSONResponse({"error": exc.reason}, status_code=401)
        webhook_id = request.headers["webhook-id"]  # verify() needs it
        if not seen.add(webhook_id):
            log.info("webhook replay acknowledged, not processed again", webhook_id=webhook_id)
            return JSONResponse({"duplicate": True})
        try:
            event = orjson.loads(body)
            event_type = event["type"]
            remote_id = (event.get("data") or {}).get("id")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return JSONResponse({"error": "not an event"}, status_code=400)
        if event_type not in BATCH_EVENTS or not isinstance(remote_id, str):
            return JSONResponse({"ignored": True})
        try:
            outcome = await run_in_threadpool(reconcile_batch_by_remote_id, daemon.ctx, remote_id)
        except BaseException:
            seen.forget(webhook_id)
            raise
        if outcome == "error":
            seen.forget(webhook_id)  # a redelivery may succeed where this failed
        return JSONResponse({"batch": remote_id, "outcome": outcome})

    async def healthz(_request: Request) -> Response:
        healthy = await run_in_threadpool(daemon.healthy)
        return JSONResponse(
            {
                "status": "ok" if healthy else "unhealthy",
                "leader": daemon.leading,
                "duties": daemon.duty_states(),
            },
            status_code=200 if healthy else 503,
        )

    async def metrics(_request: Request) -> Response:
        text = await run_in_threadpool(generate_latest, registry)
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route(WEBHOOK_PATH, openai_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )
    if settings.metrics_token is not None:
        token = settings.metrics_token.get_secret_value()
        return RequireToken(app, token, frozenset({WEBHOOK_PATH}))  # type: ignore[return-value]
    return app


class MetricsCollector(Collector):
    """Reads the database at scrape time, so every daemon reports the same truth."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        store = self.daemon.store
        with store.read() as conn:
            counts = counts_for_metrics(conn, [sink.name for sink in self.daemon.sinks])
            usage = costs.usage_by_model(conn)
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
        yield from _usage_metrics(usage, self.daemon.ctx.prices)
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
            (
                "jobqueue_orphan_batches",
                "Orphan remote batches found (a second remote batch for a local one), cancelled "
                "and their files deleted.",
                "orphan_batches",
            ),
            (
                "jobqueue_notified_wakes",
                "Wake-ups heard from other processes (PostgreSQL LISTEN/NOTIFY).",
                "notified_wakes",
            ),
        ]:
            c = CounterMetricFamily(name, help_text)
            c.add_metric([], float(stats.get(key, 0)))
            yield c
        c = CounterMetricFamily(
            "jobqueue_refused_transitions", "Illegal or stale transitions refused."
        )
        c.add_metric([], float(BATCH_MACHINE.refused_total()))
        yield c
        g = GaugeMetricFamily(
            "jobqueue_leader", "1 while this daemon leads (runs reconcile and maintenance)."
        )
        g.add_metric([], 1.0 if self.daemon.leading else 0.0)
        yield g
        runs = CounterMetricFamily("jobqueue_duty_runs", "Duty runs.", labels=["duty"])
        errors = CounterMetricFamily(
            "jobqueue_duty_errors", "Duty runs that failed.", labels=["duty"]
        )
        for duty, state in self.daemon.duty_states().items():
            runs.add_metric([duty], state["runs"])
            errors.add_metric([duty], state["errors"])
        yield runs
        yield errors


def _usage_metrics(usage: dict[str | None, Usage], prices: PriceTable) -> Iterator[Any]:
    """Tokens of the collected batches by model and kind, and what they cost by model (a model
    without a price has no cost series: unknown, never 0)."""
    tokens = CounterMetricFamily(
        "jobqueue_tokens",
        "Tokens of collected batches, by model and kind (input includes cached_input, output "
        "includes reasoning).",
        labels=["model", "kind"],
    )
    cost = CounterMetricFamily(
        "jobqueue_cost_usd",
        "What collected batches cost at Batch API prices, by model (models with a price).",
        labels=["model"],
    )
    for model, found in sorted(usage.items(), key=lambda item: item[0] or ""):
        for kind, value in found.to_dict().items():
            tokens.add_metric([model or "", kind.removesuffix("_tokens")], float(value))
        amount = prices.cost(model, found)
        if amount is not None:
            cost.add_metric([model or ""], amount)
    yield tokens
    yield cost


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
    """`HOST:PORT` as (host, port); ConfigError (a ValueError) with a one-line reason."""
    try:
        return parse_listen_address(address)
    except ValueError as exc:
        raise ConfigError(f"--listen {address[:80]!r}: {exc}") from None


def listen_socket(address: str) -> socket.socket:
    """Parse `address` and bind it now, so that a bad or busy address is refused at start-up
    (ConfigError, one line) before the daemon starts any work."""
    host, port = parse_address(address)
    try:
        return bind_socket(host, port)
    except ListenError as exc:
        raise ConfigError(f"--listen {address[:80]!r}: {exc}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def serve_in_background(daemon: Daemon, address: str | socket.socket) -> BackgroundServer:
    """Serve the app on `address` (HOST:PORT, or a socket from `listen_socket`)."""
    sock = listen_socket(address) if isinstance(address, str) else address
    host, port = sock.getsockname()[:2]
    settings = daemon.settings
    if settings.metrics_token is None and not _is_loopback(host):
        log.warning(
            "listening beyond loopback without metrics_token: /metrics and /healthz answer "
            "anyone who can reach this address (set JOBQUEUE_METRICS_TOKEN)",
            address=f"{host}:{port}",
        )
    if settings.webhook_secret is None:
        log.warning("OPENAI_WEBHOOK_SECRET is not set: POST /webhooks/openai refuses every event")
    server = BackgroundServer(
        create_server_app(daemon),
        host,
        port,
        sock=sock,
        read_timeout=settings.http_timeout,
        max_connections=settings.http_max_connections,
    ).start()
    log.info("listening", url=server.url)
    return server
