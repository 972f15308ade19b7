"""Shared pieces of the daemon tests: an emulator on a loopback port, a JobQueue pointed at it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from jobqueue.api import JobQueue

API_KEY = "sk-test-key-never-logged"


def make_queue(db_url: str, data_dir: Any, base_url: str, **settings: Any) -> JobQueue:
    defaults: dict[str, Any] = {
        "poll_interval": 0.2,
        "lease_seconds": 5.0,
        "token_limit_backoff": 0.3,
    }
    defaults.update(settings)
    return JobQueue(
        database_url=db_url, data_dir=data_dir, base_url=base_url, api_key=API_KEY, **defaults
    )


def content_of(record: dict[str, Any]) -> Any:
    """What a result says, without the ids that differ from run to run."""
    if record.get("error"):
        return ("error", record["error"].get("code"))
    body = (record.get("response") or {}).get("body") or {}
    choices = body.get("choices") or []
    if choices:
        return ("ok", choices[0]["message"]["content"])
    return ("status", (record.get("response") or {}).get("status_code"))


def remote_batches_per_local_id(emulator: Any) -> Counter[str]:
    return Counter((b.get("metadata") or {}).get("jobqueue_batch_id") for b in emulator.batches())


def wait_until(predicate: Callable[[], object], timeout: float = 30) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
