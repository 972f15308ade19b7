"""Outgoing OpenAI-style webhooks, signed with the Standard Webhooks scheme.

Self-contained on purpose: the emulator stands in for the remote and must not share code with
the client side it is testing (`jobqueue.hooks.signing`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

log = logging.getLogger("jobqueue.emulator.webhooks")

BATCH_EVENT_TYPES = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "cancelled": "batch.cancelled",
    "expired": "batch.expired",
}


def secret_key(secret: str) -> bytes:
    """The HMAC key: base64 after a `whsec_` prefix, else the secret's own bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes | str) -> str:
    """The `webhook-signature` header value for one delivery: `v1,<base64 HMAC-SHA256>`."""
    payload = body.decode() if isinstance(body, bytes) else body
    signed = f"{webhook_id}.{timestamp}.{payload}".encode()
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    secret: str, body: bytes, *, webhook_id: str | None = None, now: float | None = None
) -> dict[str, str]:
    webhook_id = webhook_id or "wh_" + secrets.token_hex(16)
    # Real wall time: receivers reject timestamps more than 300 s away from their own clock,
    # whatever the emulator's simulated clock says.
    timestamp = int(time.time() if now is None else now)
    return {
        "content-type": "application/json",
        "user-agent": "jobqueue-emulator/1 (webhooks)",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


def batch_event(status: str, batch_id: str, created_at: int) -> dict[str, Any]:
    return {
        "id": "evt_" + secrets.token_hex(16),
        "object": "event",
        "type": BATCH_EVENT_TYPES[status],
        "created_at": created_at,
        "data": {"id": batch_id},
    }


@dataclass
class DeliveryStats:
    sent: int = 0
    failed_attempts: int = 0
    given_up: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


class WebhookSender:
    """Delivers events from a background thread, retrying a few times; never blocks callers."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        attempts: int = 4,
        backoff: float = 0.25,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.secret = secret
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.stats = DeliveryStats()
        self._lock = threading.Lock()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._client = httpx.Client(timeout=timeout)
        self._thread = threading.Thread(target=self._run, name="emulator-webhooks", daemon=True)
        self._thread.start()

    def send(self, event: dict[str, Any]) -> None:
        self._queue.put(event)

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def wait_idle(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                self._deliver(event)
            finally:
                self._queue.task_done()

    def _deliver(self, event: dict[str, Any]) -> None:
        body = orjson.dumps(event)
        webhook_id = "wh_" + secrets.token_hex(16)  # the same on every retry: an idempotency key
        for attempt in range(self.attempts):
            if attempt and self._stopping.wait(self.backoff * 2 ** (attempt - 1)):
                break
            try:
                headers = signed_headers(self.secret, body, webhook_id=webhook_id)
                response = self._client.post(self.url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    with self._lock:
                        self.stats.sent += 1
                        self.stats.events.append(event)
                    return
                log.warning("webhook %s answered %s", self.url, response.status_code)
            except httpx.HTTPError as exc:
                log.warning("webhook %s failed: %s", self.url, exc)
            with self._lock:
                self.stats.failed_attempts += 1
        with self._lock:
            self.stats.given_up += 1
