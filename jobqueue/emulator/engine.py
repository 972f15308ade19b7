"""The emulator's engine: files, batches, the clock and the lifecycle. No HTTP here.

Time: the engine clock is wall time plus an offset that `advance()` grows, in real seconds.
Reported timestamps are that clock's Unix seconds, so they stay close to the client's own clock;
every configured duration is simulated and divided by `time_scale` (so at 3600 the 24 h window
ends 24 s after creation). `advance(s)` takes simulated seconds.

Work: each batch moves through timed events kept in one heap. Any API call first applies the
events that are due (in time order, each stamped with its own due time), and a ticker thread
does the same in the background so that webhooks fire without polling. Heavy work (validating
the input, writing the output files) runs on a small thread pool; a batch whose work is not
done yet simply stays in its current status until it is. Counts while `in_progress` are
computed from the clock, so reading a batch is O(1) and listing is O(page).
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import itertools
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobqueue.emulator.config import EmulatorConfig
from jobqueue.emulator.errors import ApiError, invalid_value, missing_param, not_found
from jobqueue.emulator.faults import Faults
from jobqueue.emulator.outputs import OutputPlan, OutputResult, generate
from jobqueue.emulator.responses import ENDPOINTS
from jobqueue.emulator.validation import Validation, error, validate_input
from jobqueue.emulator.webhooks import WebhookSender, batch_event

log = logging.getLogger("jobqueue.emulator")

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
MIN_EXPIRES_AFTER = 3600
MAX_EXPIRES_AFTER = 2_592_000
SCRIPT_ACTIONS = frozenset(
    {"fail", "expire_at_fraction", "stick_in", "fail_next_calls", "create_fault"}
)
STICKABLE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
CREATE_FAULTS = frozenset({"500", "429", "drop"})

FAIL_MESSAGES = {
    "token_limit_exceeded": "Enqueued token limit reached (scripted). Please try again once some "
    "in_progress batches have been completed.",
    "empty_file": "The batch input file is empty.",
    "too_many_tasks": "The batch input file contains too many requests.",
}


def _new_id(prefix: str) -> str:
    # The remote spells them `file-…` and `batch_…`.
    sep = "-" if prefix == "file" else "_"
    return f"{prefix}{sep}{secrets.token_hex(12)}"


@dataclass
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    path: Path
    expires_at: float | None = None
    deleted: bool = False
    refs: int = 0  # open batches reading this file: its bytes stay on disk until they end

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at),
            "expires_at": None if self.expires_at is None else int(self.expires_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass
class Script:
    fail: str | None = None
    expire_at_fraction: float | None = None
    stick_in: str | None = None
    fail_next_calls: int = 0
    create_fault: str | None = None


@dataclass
class BatchRecord:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    output_expires_after: float | None  # simulated seconds
    created_at: float
    expires_at: float
    status: str = "validating"
    model: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    usage: dict[str, Any] | None = None
    tokens: int = 0
    enqueued: bool = False  # counted against the enqueued-token limit
    input_file: FileRecord | None = None
    script: Script = field(default_factory=Script)
    validation: Validation | None = None
    validation_work: Future[Validation] | None = None
    # How the run ends: "completed", "expired" or "cancelled", with the requests finished then.
    ending: str | None = None
    finished: int = 0
    stop_time: float | None = None
    output_work: Future[OutputResult] | None = None
    output: OutputResult | None = None
    waiting: str | None = None  # an event postponed until its background work is done
    waiting_since: float | None = None  # when that event was due
    blocked: str | None = None  # an event held back by `stick_in`

    def to_dict(self, now: float, rate: float, failure_rate: float) -> dict[str, Any]:
        total, completed, failed = self.total, self.completed, self.failed
        if self.status in ("in_progress", "finalizing", "cancelling") and self.output is None:
            done = self.done_at(now, rate)
            failed = round(done * failure_rate)
            completed = done - failed
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": _ts(self.created_at),
            "in_progress_at": _ts(self.in_progress_at),
            "expires_at": _ts(self.expires_at),
            "finalizing_at": _ts(self.finalizing_at),
            "completed_at": _ts(self.completed_at),
            "failed_at": _ts(self.failed_at),
            "expired_at": _ts(self.expired_at),
            "cancelling_at": _ts(self.cancelling_at),
            "cancelled_at": _ts(self.cancelled_at),
            "request_counts": {"total": total, "completed": completed, "failed": failed},
            "metadata": self.metadata,
            "usage": self.usage
            or {
                "input_tokens": 0,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 0,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 0,
            },
        }

    def done_at(self, t: float, rate: float) -> int:
        """Requests finished by time `t` (they finish at `rate` a real second, in file order)."""
        if self.in_progress_at is None:
            return 0
        if self.ending is not None:
            return self.finished
        # Rounded first: timestamps near 1.8e9 carry ~1e-7 of float error.
        return max(0, min(self.total, math.floor(round((t - self.in_progress_at) * rate, 4))))


def _ts(t: float | None) -> int | None:
    return None if t is None else int(t)


class Emulator:
    """Thread-safe state of one emulated remote. Close it (or use `with`) to stop its threads."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        cfg = self.config
        self._own_dir = cfg.data_dir is None
        if cfg.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="jobqueue-emulator-"))
            # Apps used in process (no lifespan) are often never closed: clean up at exit.
            atexit.register(shutil.rmtree, self.data_dir, True)
        else:
            self.data_dir = Path(cfg.data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.faults = Faults(cfg)
        self.seed = cfg.seed if cfg.seed is not None else 0
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._offset = 0.0
        self._settling = 0
        self._events: list[tuple[float, int, str, str, Any]] = []
        self._seq = itertools.count()
        self._files: dict[str, FileRecord] = {}
        self._file_order: dict[str, list[str]] = {"*": []}  # per purpose, oldest first
        self._file_pos: dict[str, dict[str, int]] = {"*": {}}
        self._batches: dict[str, BatchRecord] = {}
        self._batch_order: list[str] = []
        self._batch_pos: dict[str, int] = {}
        self._enqueued: dict[str | None, int] = {}
        self._rules: list[tuple[dict[str, str], list[int], dict[str, Any]]] = []
        self._calls: dict[str, int] = {}
        self._counters = {"batches_created": 0, "files_created": 0}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emulator-work")
        self.webhooks: WebhookSender | None = None
        if cfg.webhook_url and cfg.webhook_secret:
            self.webhooks = WebhookSender(
                cfg.webhook_url, cfg.webhook_secret, attempts=cfg.webhook_attempts
            )
        self._closed = False
        self._ticker = threading.Thread(target=self._tick_loop, name="emulator-ticker", daemon=True)
        self._ticker.start()

    # ----------------------------------------------------------------- clock and lifecycle

    def now(self) -> float:
        return time.time() + self._offset

    @property
    def rate(self) -> float:
        """Requests finished per real second."""
        return self.config.requests_per_minute / 60.0 * self.config.time_scale

    def advance(self, seconds: float, *, settle_timeout: float = 60.0) -> None:
        """Jump the clock `seconds` simulated seconds ahead and apply everything now due.

        Waits for background work the jump made due, so that on return every batch shows the
        state it has at the new time.
        """
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += self.config.real(seconds)
        self.settle(settle_timeout)

    def settle(self, timeout: float = 60.0) -> None:
        """Apply due events, waiting for any background work that holds one back.

        While settling, work takes no simulated time: an event that waited for it happens
        when it was due, not when the thread finished (which, after a jump, is much later).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._settling += 1
        try:
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError("background work did not finish in time")
                with self._lock:
                    self._catch_up()
                    pending = [
                        work
                        for b in self._batches.values()
                        if b.waiting
                        for work in (b.validation_work, b.output_work)
                        if work is not None and not work.done()
                    ]
                if not pending:
                    with self._lock:
                        if not any(b.waiting for b in self._batches.values()):
                            return
                    time.sleep(0.001)  # work done, its callback is queueing the event
                    continue
                for work in pending:
                    with contextlib.suppress(Exception):  # handled with its event
                        work.exception(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            with self._lock:
                self._settling -= 1

    def _push(self, t: float, batch_id: str, kind: str, arg: Any = None) -> None:
        heapq.heappush(self._events, (t, next(self._seq), batch_id, kind, arg))
        self._wake.notify_all()

    def _catch_up(self) -> None:
        now = self.now()
        while self._events and self._events[0][0] <= now:
            t, _, ident, kind, arg = heapq.heappop(self._events)
            try:
                self._handle(t, ident, kind, arg)
            except Exception:
                log.exception("emulator event %s for %s failed", kind, ident)

    def _tick_loop(self) -> None:
        with self._lock:
            while not self._closed:
                self._catch_up()
                wait = 1.0
                if self._events:
                    wait = min(wait, max(0.0, self._events[0][0] - self.now()))
                self._wake.wait(timeout=max(wait, 0.001))

    def _handle(self, t: float, ident: str, kind: str, arg: Any) -> None:
        if kind == "file_expire":
            record = self._files.get(ident)
            if record is not None and not record.deleted:
                self._remove_file(record)
            return
        b = self._batches[ident]
        if b.status in TERMINAL:
            return
        if kind == "validated":
            self._on_validated(b, t)
        elif kind == "run_done":
            if b.status == "in_progress" and b.ending is None:
                if self._held(b, kind):
                    return
                b.status = "finalizing"
                b.finalizing_at = t
                self._stop_run(b, "completed", b.total, t)
                self._push(t + self.config.real(self.config.finalizing_seconds), b.id, "finalized")
        elif kind == "finalized":
            if b.status in ("finalizing", "cancelling") and not self._held(b, kind, "finalizing"):
                self._finish(b, t, kind)
        elif kind == "expire":
            self._on_expire(b, t, arg)
        elif kind == "expired" or (kind == "cancelled" and not self._held(b, kind)):
            self._finish(b, t, kind)

    def _held(self, b: BatchRecord, kind: str, state: str | None = None) -> bool:
        """Whether `stick_in` keeps the batch where it is; the event waits for unscripting."""
        if b.script.stick_in and b.script.stick_in == (state or b.status):
            b.blocked = kind
            return True
        return False

    def _on_validated(self, b: BatchRecord, t: float) -> None:
        if b.status != "validating" or b.ending is not None or self._held(b, "validated"):
            return
        work = b.validation_work
        if b.validation is None and work is not None:
            if not work.done():
                b.waiting, b.waiting_since = "validated", t
                return
            try:
                b.validation = work.result()
            except Exception as exc:
                log.exception("validation of %s failed", b.id)
                b.validation = Validation(errors=[error("server_error", str(exc))])
        b.waiting = None
        v = b.validation or Validation(errors=[error("server_error", "no validation")])
        b.model = v.model
        if b.script.fail:
            code = b.script.fail
            message = FAIL_MESSAGES.get(code, f"Validation failed: {code} (scripted).")
            return self._fail(b, t, [error(code, message)])
        if not v.ok:
            return self._fail(b, t, v.errors)
        limit = self.config.enqueued_token_limit
        open_tokens = self._enqueued.get(v.model, 0)
        if limit is not None and open_tokens + v.tokens > limit:
            message = (
                f"Enqueued token limit reached for {v.model} in organization org-emulator. "
                f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress "
                "batches have been completed."
            )
            return self._fail(b, t, [error("token_limit_exceeded", message)])
        b.total = v.total
        b.tokens = v.tokens
        b.enqueued = True
        self._enqueued[v.model] = open_tokens + v.tokens
        b.status = "in_progress"
        b.in_progress_at = t
        self._push(t + b.total / self.rate, b.id, "run_done")
        self._schedule_scripted_expiry(b)

    def _schedule_scripted_expiry(self, b: BatchRecord) -> None:
        fraction = b.script.expire_at_fraction
        if fraction is None or b.in_progress_at is None or b.ending is not None:
            return
        finished = min(b.total, math.ceil(fraction * b.total))
        self._push(b.in_progress_at + finished / self.rate, b.id, "expire", finished)

    def _on_expire(self, b: BatchRecord, t: float, finished: int | None) -> None:
        if b.ending is not None or b.status not in ("validating", "in_progress"):
            return  # finalizing and cancelling batches end their own way
        if self._held(b, "expire"):
            return
        if finished is None:
            finished = b.done_at(t, self.rate)
        if b.status == "validating":
            finished = 0
            if b.validation is None or not b.validation.ok:
                b.ending, b.stop_time = "expired", t
                return self._finish(b, t, "expired")
            b.total = b.validation.total
        self._stop_run(b, "expired", finished, t)
        self._push(t, b.id, "expired")

    def _stop_run(self, b: BatchRecord, ending: str, finished: int, t: float) -> None:
        """Freeze the run and start writing its output files."""
        b.ending, b.finished, b.stop_time = ending, finished, t
        record = b.input_file
        if record is None or b.total == 0:
            return
        unfinished = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(ending)
        plan = OutputPlan(
            input_path=record.path,
            output_path=self.files_dir / f"{b.id}.output.part",
            error_path=self.files_dir / f"{b.id}.error.part",
            endpoint=b.endpoint,
            batch_id=b.id,
            model=b.model,
            created=int(b.in_progress_at or t),
            finished=finished,
            unfinished_code=unfinished,
            failure_rate=self.faults.settings["request_failure_rate"],
            seed=self.seed,
            embedding_dimensions=self.config.embedding_dimensions,
            line_tokens=b.validation.line_tokens if b.validation is not None else None,
            shuffle=self.config.shuffle_output,
        )
        b.output_work = self._pool.submit(generate, plan)
        b.output_work.add_done_callback(self._when_done(b.id))

    def _when_done(self, ident: str) -> Callable[[Future[Any]], None]:
        """A done-callback for batch `ident`'s background work."""
        return lambda _future: self._work_done(ident)

    def _work_done(self, ident: str) -> None:
        with self._lock:
            b = self._batches.get(ident)
            if b is not None and b.waiting and b.status not in TERMINAL:
                due = b.waiting_since if self._settling and b.waiting_since else self.now()
                self._push(due, ident, b.waiting)

    def _finish(self, b: BatchRecord, t: float, kind: str) -> None:
        """End the batch as its run decided, once its output files are written."""
        work = b.output_work
        if work is not None and b.output is None:
            if not work.done():
                b.waiting, b.waiting_since = kind, t
                return
            try:
                b.output = work.result()
            except Exception as exc:
                log.exception("output generation of %s failed", b.id)
                return self._fail(b, t, [error("server_error", f"output generation: {exc}")])
        b.waiting = None
        if b.validation is not None:
            b.validation.line_tokens = None  # only the output needed them
        out = b.output or OutputResult()
        ending = b.ending or "completed"
        b.completed, b.failed = out.completed, out.failed
        if ending == "cancelled" and b.output is None:
            b.total = 0  # cancelled before it ran: nothing to report
        if out.completed:
            b.output_file_id = self._adopt_output(b, "output", out.output_bytes, t)
        if out.failed:
            b.error_file_id = self._adopt_output(b, "error", out.error_bytes, t)
        for suffix in ("output", "error"):
            with contextlib.suppress(FileNotFoundError):
                (self.files_dir / f"{b.id}.{suffix}.part").unlink()
        # The sums over the requests that ran (the output file's lines), as the remote reports.
        b.usage = {
            "input_tokens": out.input_tokens,
            "input_tokens_details": {"cached_tokens": out.cached_tokens},
            "output_tokens": out.output_tokens,
            "output_tokens_details": {"reasoning_tokens": out.reasoning_tokens},
            "total_tokens": out.input_tokens + out.output_tokens,
        }
        if ending == "completed":
            b.completed_at = t
        elif ending == "expired":
            b.expired_at = b.stop_time or t
        else:
            b.cancelled_at = t
        self._end(b, ending, t)

    def _fail(self, b: BatchRecord, t: float, errors: list[dict[str, Any]]) -> None:
        b.errors = errors
        b.failed_at = t
        self._end(b, "failed", t)

    def _end(self, b: BatchRecord, status: str, t: float) -> None:
        b.status = status
        b.waiting = b.blocked = None
        if b.enqueued:
            self._enqueued[b.model] = self._enqueued.get(b.model, 0) - b.tokens
            b.enqueued = False
        if b.input_file is not None:
            self._release_file(b.input_file)
        if self.webhooks is not None:
            self.webhooks.send(batch_event(status, b.id, int(t)))

    def _adopt_output(self, b: BatchRecord, kind: str, size: int, t: float) -> str:
        file_id = _new_id("file")
        path = self.files_dir / file_id
        os.replace(self.files_dir / f"{b.id}.{kind}.part", path)
        expires = None
        if b.output_expires_after is not None:
            expires = t + self.config.real(b.output_expires_after)
        self._register_file(
            FileRecord(
                id=file_id,
                filename=f"{b.id}_{kind}.jsonl",
                purpose="batch_output",
                bytes=size,
                created_at=t,
                path=path,
                expires_at=expires,
            )
        )
        return file_id

    # ----------------------------------------------------------------- files

    def add_file(
        self,
        source: Path,
        *,
        filename: str,
        purpose: str,
        size: int,
        expires_after_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Take an uploaded file (moved, not copied, from `source`) and return its object."""
        file_id = _new_id("file")
        path = self.files_dir / file_id
        os.replace(source, path)
        with self._lock:
            self._catch_up()
            now = self.now()
            expires = None
            if expires_after_seconds is not None:
                expires = now + self.config.real(expires_after_seconds)
            record = FileRecord(
                id=file_id,
                filename=filename,
                purpose=purpose,
                bytes=size,
                created_at=now,
                path=path,
                expires_at=expires,
            )
            self._register_file(record)
            self._counters["files_created"] += 1
            return record.to_dict()

    def upload_path(self) -> Path:
        """A fresh path in the data dir for an upload in progress (same filesystem: no copy)."""
        return self.files_dir / f"upload-{secrets.token_hex(8)}.part"

    def _register_file(self, record: FileRecord) -> None:
        self._files[record.id] = record
        for key in ("*", record.purpose):
            order = self._file_order.setdefault(key, [])
            self._file_pos.setdefault(key, {})[record.id] = len(order)
            order.append(record.id)
        if record.expires_at is not None:
            self._push(record.expires_at, record.id, "file_expire")

    def _live_file(self, file_id: str) -> FileRecord:
        record = self._files.get(file_id)
        if record is None or record.deleted:
            raise not_found("file", file_id)
        if record.expires_at is not None and record.expires_at <= self.now():
            self._remove_file(record)
            raise not_found("file", file_id)
        return record

    def get_file(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            self._catch_up()
            return self._live_file(file_id).to_dict()

    def file_content(self, file_id: str) -> tuple[Path, int, str]:
        """(path, size, filename) of a file's bytes, for streaming."""
        with self._lock:
            self._catch_up()
            record = self._live_file(file_id)
            return record.path, record.bytes, record.filename

    def delete_file(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            self._catch_up()
            record = self._live_file(file_id)
            self._remove_file(record)
            return {"id": file_id, "object": "file", "deleted": True}

    def _remove_file(self, record: FileRecord) -> None:
        record.deleted = True
        if record.refs == 0:
            with contextlib.suppress(FileNotFoundError):
                record.path.unlink()

    def _release_file(self, record: FileRecord) -> None:
        record.refs -= 1
        if record.deleted and record.refs == 0:
            with contextlib.suppress(FileNotFoundError):
                record.path.unlink()

    def list_files(
        self,
        *,
        purpose: str | None = None,
        limit: int = 10000,
        order: str = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        if not 1 <= limit <= 10000:
            raise invalid_value("limit", "limit must be between 1 and 10000.")
        if order not in ("asc", "desc"):
            raise invalid_value("order", "order must be 'asc' or 'desc'.")
        with self._lock:
            self._catch_up()
            key = purpose or "*"
            ids = self._file_order.get(key, [])
            positions = self._file_pos.get(key, {})
            step = -1 if order == "desc" else 1
            if after is not None:
                if after not in positions:
                    raise not_found("file", after)
                start = positions[after] + step
            else:
                start = len(ids) - 1 if step < 0 else 0
            data: list[dict[str, Any]] = []
            i = start
            now = self.now()
            while 0 <= i < len(ids) and len(data) <= limit:
                record = self._files[ids[i]]
                i += step
                if record.deleted or (record.expires_at is not None and record.expires_at <= now):
                    continue
                data.append(record.to_dict())
            has_more = len(data) > limit
            data = data[:limit]
            return {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": has_more,
            }

    # ----------------------------------------------------------------- batches

    def create_batch(self, payload: Any) -> tuple[dict[str, Any], str | None]:
        """(the new batch, a scripted fault to answer the create call with, or None)."""
        if not isinstance(payload, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        input_file_id = payload.get("input_file_id")
        endpoint = payload.get("endpoint")
        window = payload.get("completion_window")
        for name, value in (
            ("input_file_id", input_file_id),
            ("endpoint", endpoint),
            ("completion_window", window),
        ):
            if value is None:
                raise missing_param(name)
        if endpoint not in ENDPOINTS:
            raise invalid_value(
                "endpoint",
                f"Invalid value for 'endpoint': '{endpoint}'. Supported values are: "
                + ", ".join(f"'{e}'" for e in ENDPOINTS)
                + ".",
            )
        if window != "24h":
            raise invalid_value(
                "completion_window",
                f"Invalid value for 'completion_window': '{window}'. Supported values are: '24h'.",
            )
        if not isinstance(input_file_id, str):
            raise invalid_value("input_file_id", "input_file_id must be a string.")
        metadata = _check_metadata(payload.get("metadata"))
        output_expires = check_expires_after(
            payload.get("output_expires_after"), "output_expires_after"
        )
        cfg = self.config
        with self._lock:
            self._catch_up()
            now = self.now()
            b = BatchRecord(
                id=_new_id("batch"),
                endpoint=endpoint,
                input_file_id=input_file_id,
                completion_window=window,
                metadata=metadata,
                output_expires_after=output_expires,
                created_at=now,
                expires_at=now + cfg.real(cfg.completion_window_seconds),
            )
            self._apply_rules(b)
            record = self._files.get(input_file_id)
            if record is None or record.deleted:
                b.validation = Validation(
                    errors=[
                        error(
                            "file_not_found",
                            f"The input file '{input_file_id}' could not be found.",
                            "input_file_id",
                        )
                    ]
                )
            elif record.purpose != "batch":
                b.validation = Validation(
                    errors=[
                        error(
                            "invalid_request",
                            f"The input file must have purpose 'batch', not '{record.purpose}'.",
                            "input_file_id",
                        )
                    ]
                )
            else:
                record.refs += 1
                b.input_file = record
                b.validation_work = self._pool.submit(
                    validate_input,
                    record.path,
                    endpoint,
                    size=record.bytes,
                    max_requests=cfg.max_requests,
                    max_bytes=cfg.max_bytes,
                )
                b.validation_work.add_done_callback(self._when_done(b.id))
            self._batches[b.id] = b
            self._batch_pos[b.id] = len(self._batch_order)
            self._batch_order.append(b.id)
            self._counters["batches_created"] += 1
            self._push(now + cfg.real(cfg.validating_seconds), b.id, "validated")
            self._push(b.expires_at, b.id, "expire")
            create_fault, b.script.create_fault = b.script.create_fault, None
            return self._view(b), create_fault

    def _apply_rules(self, b: BatchRecord) -> None:
        meta = b.metadata or {}
        for rule in self._rules:
            match, times, actions = rule
            if all(meta.get(k) == v for k, v in match.items()):
                times[0] -= 1
                if times[0] <= 0:
                    self._rules.remove(rule)
                self._set_script(b, actions)
                return

    def _view(self, b: BatchRecord) -> dict[str, Any]:
        return b.to_dict(self.now(), self.rate, self.faults.settings["request_failure_rate"])

    def _batch(self, batch_id: str) -> BatchRecord:
        b = self._batches.get(batch_id)
        if b is None:
            raise not_found("batch", batch_id)
        return b

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            self._catch_up()
            return self._view(self._batch(batch_id))

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            self._catch_up()
            b = self._batch(batch_id)
            if b.status in TERMINAL:
                raise ApiError(409, f"Cannot cancel a batch with status '{b.status}'.")
            if b.status == "cancelling" or b.ending == "expired":
                # A second cancel is accepted as is; an expiring batch just ends expired.
                return self._view(b)
            now = self.now()
            was = b.status
            b.status = "cancelling"
            b.cancelling_at = now
            b.blocked = None
            if was == "finalizing":
                # The outputs are being written already: the batch still ends completed.
                return self._view(b)
            if was == "in_progress" and b.ending is None:
                self._stop_run(b, "cancelled", b.done_at(now, self.rate), now)
            else:
                b.ending, b.stop_time = "cancelled", now
            self._push(now + self.config.real(self.config.cancelling_seconds), b.id, "cancelled")
            return self._view(b)

    def list_batches(self, *, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise invalid_value("limit", "limit must be between 1 and 100.")
        with self._lock:
            self._catch_up()
            if after is not None:
                if after not in self._batch_pos:
                    raise not_found("batch", after)
                start = self._batch_pos[after] - 1
            else:
                start = len(self._batch_order) - 1
            stop = max(-1, start - limit)
            data = [self._view(self._batches[self._batch_order[i]]) for i in range(start, stop, -1)]
            return {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": stop >= 0,
            }

    # ----------------------------------------------------------------- scripting and control

    def script(self, batch_id: str, **actions: Any) -> dict[str, Any]:
        """Script one batch: `fail`, `expire_at_fraction`, `stick_in`, `fail_next_calls`."""
        with self._lock:
            self._catch_up()
            b = self._batch(batch_id)
            self._set_script(b, actions)
            return self._view(b)

    def script_next(
        self, match_metadata: dict[str, str] | None = None, *, times: int = 1, **actions: Any
    ) -> None:
        """Apply `actions` to the next `times` created batches whose metadata has these pairs.

        Besides the `script` actions, `create_fault` ("500", "429" or "drop") creates the batch
        and then answers the create call with that fault, as if the answer were lost.
        """
        _check_actions(actions)
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._rules.append((dict(match_metadata or {}), [times], actions))

    def _set_script(self, b: BatchRecord, actions: dict[str, Any]) -> None:
        _check_actions(actions)
        s = b.script
        if "fail" in actions:
            s.fail = actions["fail"] or None
        if "fail_next_calls" in actions:
            s.fail_next_calls = int(actions["fail_next_calls"])
        if "create_fault" in actions:
            s.create_fault = actions["create_fault"]
        if "expire_at_fraction" in actions:
            s.expire_at_fraction = actions["expire_at_fraction"]
            if b.status == "in_progress":
                self._schedule_scripted_expiry(b)
        if "stick_in" in actions:
            s.stick_in = actions["stick_in"] or None
            if b.blocked and s.stick_in != b.status:
                kind, b.blocked = b.blocked, None
                self._push(self.now(), b.id, kind)

    def take_call_fault(self, batch_id: str) -> bool:
        """Whether this call touching `batch_id` must fail (`fail_next_calls`)."""
        with self._lock:
            b = self._batches.get(batch_id)
            if b is None or b.script.fail_next_calls <= 0:
                return False
            b.script.fail_next_calls -= 1
            return True

    def set_faults(self, **probabilities: Any) -> dict[str, float]:
        return self.faults.update(**probabilities)

    def count_call(self, route: str) -> None:
        with self._lock:
            self._calls[route] = self._calls.get(route, 0) + 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._catch_up()
            statuses: dict[str, int] = {}
            for b in self._batches.values():
                statuses[b.status] = statuses.get(b.status, 0) + 1
            out: dict[str, Any] = {
                "calls": dict(self._calls),
                **self._counters,
                "batch_statuses": statuses,
                "enqueued_tokens": {str(k): v for k, v in self._enqueued.items() if v},
                "faults": self.faults.snapshot(),
            }
        if self.webhooks is not None:
            ws = self.webhooks.stats
            out["webhooks"] = {
                "sent": ws.sent,
                "failed_attempts": ws.failed_attempts,
                "given_up": ws.given_up,
            }
        return out

    def batches(self) -> list[dict[str, Any]]:
        """Every batch object, oldest first."""
        with self._lock:
            self._catch_up()
            return [self._view(self._batches[i]) for i in self._batch_order]

    # ----------------------------------------------------------------- teardown

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
        self._ticker.join(5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.webhooks is not None:
            self.webhooks.close()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_actions(actions: dict[str, Any]) -> None:
    unknown = set(actions) - SCRIPT_ACTIONS
    if unknown:
        raise ValueError(
            f"unknown script actions {sorted(unknown)}; known: {sorted(SCRIPT_ACTIONS)}"
        )
    stick = actions.get("stick_in")
    if stick and stick not in STICKABLE:
        raise ValueError(f"stick_in must be one of {sorted(STICKABLE)}")
    fraction = actions.get("expire_at_fraction")
    if fraction is not None and not 0 <= float(fraction) <= 1:
        raise ValueError("expire_at_fraction must be in [0, 1]")
    fault = actions.get("create_fault")
    if fault is not None and fault not in CREATE_FAULTS:
        raise ValueError(f"create_fault must be one of {sorted(CREATE_FAULTS)}")


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise invalid_value("metadata", "metadata must be an object of string pairs.")
    if len(metadata) > 16:
        raise invalid_value("metadata", "metadata may hold at most 16 pairs.")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise invalid_value("metadata", f"metadata value for '{key}' must be a string.")
        if len(key) > 64:
            raise invalid_value("metadata", "metadata keys are at most 64 characters.")
        if len(value) > 512:
            raise invalid_value("metadata", "metadata values are at most 512 characters.")
    return dict(metadata)


def check_expires_after(value: Any, param: str) -> float | None:
    """Seconds of an `{"anchor": "created_at", "seconds": n}` object, or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_value(param, f"'{param}' must be an object.")
    if value.get("anchor") != "created_at":
        raise invalid_value(f"{param}.anchor", "The only supported anchor is 'created_at'.")
    seconds = value.get("seconds")
    if isinstance(seconds, str) and seconds.isdigit():
        seconds = int(seconds)
    if not isinstance(seconds, int) or not MIN_EXPIRES_AFTER <= seconds <= MAX_EXPIRES_AFTER:
        raise invalid_value(
            f"{param}.seconds",
            f"'{param}.seconds' must be an integer between {MIN_EXPIRES_AFTER} and "
            f"{MAX_EXPIRES_AFTER}.",
        )
    return float(seconds)
