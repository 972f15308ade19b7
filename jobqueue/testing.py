"""An in-memory remote for tests: jobqueue's own, and yours.

`InMemoryRemote` implements the `jobqueue.remote.Provider` protocol (Files and Batches) with
plain Python objects: no HTTP, no threads of its own, no sleeping. Nothing happens by itself: a
batch stays `validating` until the test moves it on, so every step of a lifecycle, and every
interleaving of two daemons with it, can be driven and asserted one at a time::

    from jobqueue import JobQueue
    from jobqueue.testing import InMemoryRemote

    remote = InMemoryRemote()              # or auto_complete=True: every batch completes at once
    jq = JobQueue(database_url="sqlite:///test.db", data_dir=tmp_path, poll_interval=0.1)
    job = jq.submit("requests.jsonl", endpoint="/v1/chat/completions")
    jq.start(provider=remote)              # the daemon's duties, against the in-memory remote
    (batch,) = remote.wait_for_batches(1)  # the daemon submitted the job's one batch
    remote.advance(batch.id, "in_progress")
    remote.complete(batch.id, errors={"req-3": 400})   # req-3 is refused, the others succeed
    job = jq.wait(job.id, timeout=10)
    assert job.request_counts.failed == 1  # a 400 is final; a 500 would have been retried

What it offers:

- **Lifecycle, driven by the test**: `advance(id, "in_progress" | "finalizing" | "cancelling")`,
  `complete(id, outputs=..., errors=..., missing=...)`, `expire(id, finished=n)`,
  `fail(id, code=..., message=...)`, `finish_cancel(id, finished=n)`. Illegal steps (completing
  a failed batch) raise `ValueError`: they are mistakes of the test, not remote behaviour.
  `InMemoryRemote(auto_complete=True)` completes every batch as it is created instead (the create
  answer still says `validating`), for tests that only care about the end result.
- **Result files made from the uploaded input**: every request line gets a success line whose
  body comes from `responder(line)` (default `echo_response`: a chat completion, embedding or
  response echoing the input), unless `outputs` gives its body, `errors` fails it (an int is an
  HTTP status answered in the error file, a str an error code with no response) or `missing`
  leaves it out. Expired and cancelled batches give their unfinished requests `batch_expired` /
  `batch_cancelled` lines. Output and error file ids are null when there is nothing to put in
  them, as documented.
- **What the remote keeps**: each batch's metadata (`find_batch_by_metadata` walks newest first
  and stops at `created_after`, like the HTTP client), file names, purposes, expiry times (a file
  past its `expires_at` on the clock is gone: 404), request counts and status times.
- **Faults**: `fault("create_batch", TransientRemoteError("timeout", maybe_created=True),
  when="after")` raises on the next create *after* the batch was created (a lost answer);
  `nth=3` picks the third call from now, `times=None` every call from then on. Any exception may
  be raised, not only `RemoteError`s (a `BaseException` subclass stands in for a crash).
- **Delays and pauses**: `on_call(method, hook)` runs `hook(call)` inside the call (before or
  after its effect), e.g. `lambda call: clock.advance(60)` for a call that takes a minute;
  `pause(method)` holds a call mid-flight until the test releases it::

      with remote.pause("create_batch") as paused:
          worker = threading.Thread(target=submit_once, args=(ctx_one,)); worker.start()
          paused.wait()                  # daemon one is inside create_batch, not yet created
          submit_once(ctx_two)           # meanwhile daemon two runs
      worker.join()                      # leaving the block released the call

- **Timeouts**: with `call_timeout=seconds`, a call held longer than that on the clock (by a
  hook that advances it, or a pause while the test advances it) fails as the HTTP client's
  would: `TransientRemoteError`, with `maybe_created=True` for a create. Held before its effect,
  the call never takes effect; held after it, only the answer is lost. File transfers
  (`upload_file`, `download_file`) take as long as their size needs and never time out here.
  `max_call_seconds` is `call_timeout` (0 without one): what jobqueue's lease on a batch must
  outlive when it starts a create.
- **A record of every call**: `calls` (and `calls_to(method)`) hold each protocol call in
  order: method, arguments by name, the clock's time, the thread, and its result or error.
  Test-side helpers (`advance`, `complete`, `batches`, ...) are not recorded.

Timestamps come from `clock`: a `Clock` here, or `time.time` by default (use the default, or a
`Clock` starting now, when jobqueue's duties run on the real clock, since crash recovery compares
the remote's `created_at` with local times). Every method is thread-safe; hooks and pauses run
outside the remote's lock, so a paused call holds up no other call.

This module imports nothing of jobqueue but `jobqueue.remote`.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from jobqueue.remote.base import (
    BatchPage,
    IncompleteDownloadError,
    NotFoundError,
    PermanentRemoteError,
    RemoteBatch,
    RemoteFile,
    TransientRemoteError,
)

__all__ = [
    "Call",
    "Clock",
    "InMemoryRemote",
    "Pause",
    "Rule",
    "echo_response",
]

When = Literal["before", "after"]
ErrorSpec = int | str
Responder = Callable[[dict[str, Any]], dict[str, Any]]

METHODS = frozenset(
    {
        "upload_file",
        "retrieve_file",
        "download_file",
        "delete_file",
        "create_batch",
        "retrieve_batch",
        "list_batches",
        "find_batch_by_metadata",
        "cancel_batch",
    }
)
# Calls whose time depends on the size of what they move: `call_timeout` does not bound them.
_TRANSFERS = frozenset({"upload_file", "download_file"})
ENDPOINTS = frozenset(
    {
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
    }
)
COMPLETION_WINDOW_SECONDS = 24 * 3600
MAX_FILE_BYTES = 200 * 1024 * 1024
UNFINISHED_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}
# The remote's own lifecycle: which test-driven step may follow which status.
_OPEN = ("validating", "in_progress", "finalizing", "cancelling")
_STEPS: dict[str, tuple[str, ...]] = {
    "in_progress": ("validating",),
    "finalizing": ("validating", "in_progress"),
    "cancelling": ("validating", "in_progress"),
    "completed": _OPEN,
    "failed": _OPEN,
    "expired": _OPEN,
    "cancelled": ("cancelling",),
}
_TIME_FIELD = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "cancelling": "cancelling_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelled": "cancelled_at",
}


class Clock:
    """A clock that moves only when told to. Call it for the time: it is a
    `Callable[[], float]`, so it goes where jobqueue takes a clock (`DutyContext(clock=...)`,
    `Daemon(clock=...)`, `InMemoryRemote(clock=...)`).

    It starts at `start`, else at the real time of its creation in whole seconds (so the times
    it gives sit next to those jobqueue stamps with the real clock, e.g. at submission)."""

    def __init__(self, start: float | None = None) -> None:
        self._now = float(int(time.time()) if start is None else start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds` (never back); return the new time."""
        if seconds < 0:
            raise ValueError(f"a Clock only moves forward, not by {seconds}")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, when: float) -> None:
        """Move forward to `when`."""
        with self._lock:
            if when < self._now:
                raise ValueError(f"a Clock only moves forward: {when} is before {self._now}")
            self._now = float(when)

    def __repr__(self) -> str:
        return f"Clock({self():.3f})"


@dataclass
class Call:
    """One call of a provider method, recorded when it starts and completed when it ends."""

    method: str
    args: dict[str, Any]
    time: float  # the remote's clock when the call started
    thread: str
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class Pause:
    """Holds the matching call mid-flight (see `InMemoryRemote.pause`) until `release()`.

    `wait()` blocks until a call reached the pause and returns it. A pause never released lets
    the call go on after `timeout` seconds with a `TimeoutError`, so a failing test cannot hang
    a thread for ever. As a context manager it releases on exit.
    """

    def __init__(self, method: str, timeout: float) -> None:
        self.method = method
        self.timeout = timeout
        self.call: Call | None = None
        self._reached = threading.Event()
        self._released = threading.Event()

    @property
    def reached(self) -> bool:
        return self._reached.is_set()

    def wait(self, timeout: float = 10.0) -> Call:
        """The call held here, once one arrives; `TimeoutError` if none does in `timeout` s."""
        if not self._reached.wait(timeout):
            raise TimeoutError(f"no {self.method} call reached the pause in {timeout}s")
        assert self.call is not None
        return self.call

    def release(self) -> None:
        self._released.set()

    def _hold(self, call: Call) -> None:
        self.call = call
        self._reached.set()
        if not self._released.wait(self.timeout):
            raise TimeoutError(f"the pause in {self.method} was not released in {self.timeout}s")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Rule:
    method: str
    when: When
    nth: int
    times: int | None
    action: Callable[[Call], object]
    seen: int = 0
    removed: bool = False

    def matches(self) -> bool:
        """Count one more call of our method; whether this one is ours."""
        if self.removed:
            return False
        self.seen += 1
        if self.seen < self.nth:
            return False
        return self.times is None or self.seen < self.nth + self.times


class Rule:
    """A hook or fault registered on the remote; `remove()` takes it off."""

    def __init__(self, rule: _Rule) -> None:
        self._rule = rule

    @property
    def fired(self) -> int:
        """How many calls it acted on so far."""
        r = self._rule
        if r.seen < r.nth:
            return 0
        hits = r.seen - r.nth + 1
        return hits if r.times is None else min(hits, r.times)

    def remove(self) -> None:
        self._rule.removed = True


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int
    expires_at: int | None

    def view(self) -> RemoteFile:
        return RemoteFile.from_api(
            {
                "id": self.id,
                "object": "file",
                "bytes": len(self.content),
                "filename": self.filename,
                "purpose": self.purpose,
                "status": "processed",
                "created_at": self.created_at,
                "expires_at": self.expires_at,
            }
        )


@dataclass
class _Batch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str]
    output_expires_after: int | None
    created_at: int
    expires_at: int
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    model: str | None = None
    lines: list[dict[str, Any]] | None = None  # the input's requests, read at create
    invalid: dict[str, Any] | None = None  # the validation error it will fail with

    def view(self) -> RemoteBatch:
        data: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": dict(self.metadata),
            "errors": {"object": "list", "data": [dict(e) for e in self.errors]}
            if self.errors
            else None,
            "usage": dict(self.usage) if self.usage else None,
        }
        for column in _TIME_FIELD.values():
            data[column] = self.times.get(column)
        return RemoteBatch.from_api(data)


def echo_response(line: dict[str, Any]) -> dict[str, Any]:
    """The default success body for a request line: the shape of the endpoint's answer, with
    content that echoes the request (a chat answer ends with the last user message's text)."""
    raw = line.get("body")
    body: dict[str, Any] = raw if isinstance(raw, dict) else {}
    model = body.get("model")
    url = line.get("url")
    custom_id = str(line.get("custom_id"))
    if url == "/v1/embeddings":
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        dims = int(body.get("dimensions") or 3)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.0] * dims}
                for i in range(len(items))
            ],
            "model": model,
            "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
        }
    text = _prompt_text(body)
    if url == "/v1/chat/completions":
        return {
            "id": f"chatcmpl-{custom_id}",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"echo: {text}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    if url == "/v1/responses":
        return {
            "id": f"resp_{custom_id}",
            "object": "response",
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": f"echo: {text}"}],
                }
            ],
        }
    if url == "/v1/completions":
        return {
            "id": f"cmpl-{custom_id}",
            "object": "text_completion",
            "model": model,
            "choices": [{"index": 0, "text": f"echo: {text}", "finish_reason": "stop"}],
        }
    return {"id": f"echo-{custom_id}", "model": model, "echo": body}


def _prompt_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                return content if isinstance(content, str) else json.dumps(content)
    for key in ("input", "prompt"):
        value = body.get(key)
        if isinstance(value, str):
            return value
    return ""


def _error(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> PermanentRemoteError:
    cls = NotFoundError if status == 404 else PermanentRemoteError
    return cls(message, status=status, code=code, type="invalid_request_error", param=param)


class InMemoryRemote:
    """A `Provider` held in memory and driven by the test; see the module docstring."""

    name = "memory"
    max_requests_per_file = 50_000

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        responder: Responder = echo_response,
        auto_complete: bool = False,
        call_timeout: float | None = None,
    ) -> None:
        if call_timeout is not None and call_timeout <= 0:
            raise ValueError(f"call_timeout must be positive, not {call_timeout}")
        self.clock = clock
        self.call_timeout = call_timeout
        self.responder = responder
        self.auto_complete = auto_complete
        self.closed = False
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}  # in creation order
        self._calls: list[Call] = []
        self._rules: list[_Rule] = []

    def __repr__(self) -> str:
        return f"InMemoryRemote(batches={len(self._batches)}, files={len(self._files)})"

    @property
    def max_call_seconds(self) -> float:
        """The longest a call can take: `call_timeout`, or 0 when calls never time out."""
        return self.call_timeout or 0.0

    # -- faults, hooks, pauses ----------------------------------------------------------------

    def on_call(
        self,
        method: str,
        hook: Callable[[Call], object],
        *,
        nth: int = 1,
        times: int | None = 1,
        when: When = "before",
    ) -> Rule:
        """Run `hook(call)` inside calls of `method`: the `nth` from now (1 = the next one),
        and the `times - 1` after it (`times=None`: every one from then on). `when` is
        "before" the call takes effect or "after" it (the effect is done, the answer not yet
        returned). What the hook raises, the call raises."""
        if method not in METHODS:
            raise ValueError(f"no provider method {method!r}; one of {', '.join(sorted(METHODS))}")
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', not {when!r}")
        if nth < 1 or (times is not None and times < 1):
            raise ValueError("nth and times count from 1")
        rule = _Rule(method, when, nth, times, hook)
        with self._lock:
            self._rules.append(rule)
        return Rule(rule)

    def fault(
        self,
        method: str,
        error: BaseException | Callable[[], BaseException],
        *,
        nth: int = 1,
        times: int | None = 1,
        when: When = "before",
    ) -> Rule:
        """Raise `error` (or what `error()` returns) from calls of `method`, chosen as for
        `on_call`. With `when="after"` the call has taken effect first: a create whose answer
        was lost, an upload that happened but reported a timeout."""

        def raise_it(_call: Call) -> None:
            raise error() if callable(error) and not isinstance(error, BaseException) else error

        return self.on_call(method, raise_it, nth=nth, times=times, when=when)

    def pause(
        self, method: str, *, nth: int = 1, when: When = "before", timeout: float = 30.0
    ) -> Pause:
        """Hold the chosen call of `method` until the returned `Pause` is released."""
        paused = Pause(method, timeout)
        self.on_call(method, paused._hold, nth=nth, when=when)
        return paused

    def _call(self, method: str, args: dict[str, Any], effect: Callable[[], Any]) -> Any:
        with self._lock:
            call = Call(method, args, self.clock(), threading.current_thread().name)
            self._calls.append(call)
            ours = [r for r in self._rules if r.method == method and r.matches()]
        try:
            for rule in ours:
                if rule.when == "before":
                    rule.action(call)
            self._check_timeout(call)
            with self._changed:
                result = effect()
                self._changed.notify_all()
            for rule in ours:
                if rule.when == "after":
                    rule.action(call)
            self._check_timeout(call)
        except BaseException as exc:
            with self._lock:
                call.error, call.done = exc, True
            raise
        with self._lock:
            call.result, call.done = result, True
        return result

    def _check_timeout(self, call: Call) -> None:
        """A call held past `call_timeout` on the clock fails as the HTTP client would."""
        if self.call_timeout is None or call.method in _TRANSFERS:
            return
        held = self.clock() - call.time
        if held > self.call_timeout:
            raise TransientRemoteError(
                f"{call.method} timed out after {held:g}s (call_timeout {self.call_timeout:g}s)",
                maybe_created=call.method == "create_batch",
            )

    # -- what the test reads ------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """Every provider call so far, in the order they started."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if c.method == method]

    def clear_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    def batches(self, **metadata: str) -> list[RemoteBatch]:
        """Every batch in creation order; with keywords, those whose metadata has them all
        (`remote.batches(jobqueue_batch_id=local_id)`)."""
        with self._lock:
            return [
                b.view()
                for b in self._batches.values()
                if all(b.metadata.get(k) == v for k, v in metadata.items())
            ]

    def batch(self, batch_id: str) -> RemoteBatch:
        with self._lock:
            return self._get_batch(batch_id).view()

    def wait_for_batches(self, count: int = 1, timeout: float = 10.0) -> list[RemoteBatch]:
        """Block until at least `count` batches exist (the daemon runs in other threads);
        return them all. `TimeoutError` when they do not appear in `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._batches) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._batches)} of {count} batches after {timeout}s")
                self._changed.wait(left)
            return [b.view() for b in self._batches.values()]

    def files(self, purpose: str | None = None) -> list[RemoteFile]:
        """Files not deleted, in upload order (expired ones included)."""
        with self._lock:
            return [f.view() for f in self._files.values() if purpose in (None, f.purpose)]

    def file_content(self, file_id: str) -> bytes:
        with self._lock:
            found = self._files.get(file_id)
            if found is None:
                raise KeyError(f"no file {file_id!r}")
            return found.content

    def drop_file(self, file_id: str) -> None:
        """The remote loses a file (deleted or expired on its side): it answers 404 from now."""
        with self._lock:
            if self._files.pop(file_id, None) is None:
                raise KeyError(f"no file {file_id!r}")

    # -- lifecycle steps the test drives ------------------------------------------------------

    def advance(self, batch_id: str, status: str) -> RemoteBatch:
        """Move a batch to `in_progress`, `finalizing` or `cancelling`."""
        if status not in ("in_progress", "finalizing", "cancelling"):
            raise ValueError(
                f"advance() moves to in_progress, finalizing or cancelling, not {status!r}: "
                "use complete(), expire(), fail() or finish_cancel() to end a batch"
            )
        with self._changed:
            b = self._step(batch_id, status)
            self._changed.notify_all()
            return b.view()

    def complete(
        self,
        batch_id: str,
        *,
        outputs: Mapping[str, dict[str, Any]] | None = None,
        errors: Mapping[str, ErrorSpec] | None = None,
        missing: Iterable[str] = (),
    ) -> RemoteBatch:
        """End a batch `completed`: every request gets an output line, except those in
        `errors` (an int: that HTTP status with an error body, in the error file; a str: that
        error code with no response) and those in `missing` (no line at all). `outputs` gives
        the response body of chosen requests; the others get `responder(line)`."""
        with self._changed:
            b = self._step(batch_id, "completed")
            self._results(b, b.lines or [], [], None, outputs, errors, missing)
            self._changed.notify_all()
            return b.view()

    def expire(
        self,
        batch_id: str,
        *,
        finished: int = 0,
        outputs: Mapping[str, dict[str, Any]] | None = None,
        errors: Mapping[str, ErrorSpec] | None = None,
    ) -> RemoteBatch:
        """End a batch `expired`: its first `finished` requests (in input order) ran, as in
        `complete`; the others get a `batch_expired` error line."""
        with self._changed:
            b = self._step(batch_id, "expired")
            lines = b.lines or []
            self._results(b, lines[:finished], lines[finished:], "batch_expired", outputs, errors)
            self._changed.notify_all()
            return b.view()

    def finish_cancel(
        self,
        batch_id: str,
        *,
        finished: int = 0,
        outputs: Mapping[str, dict[str, Any]] | None = None,
        errors: Mapping[str, ErrorSpec] | None = None,
    ) -> RemoteBatch:
        """End a `cancelling` batch `cancelled`: its first `finished` requests ran, the others
        get a `batch_cancelled` error line."""
        with self._changed:
            b = self._step(batch_id, "cancelled")
            lines = b.lines or []
            self._results(b, lines[:finished], lines[finished:], "batch_cancelled", outputs, errors)
            self._changed.notify_all()
            return b.view()

    def fail(
        self,
        batch_id: str,
        code: str | None = None,
        message: str | None = None,
        *,
        line: int | None = None,
        param: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> RemoteBatch:
        """End a batch `failed` with one error (`code`, `message`, `line`, `param`) or the
        given `errors` list; no result files. A batch created on a missing input file fails
        with `file_not_found` when no code is given. For the enqueued-token limit:
        `fail(id, "token_limit_exceeded", "Enqueued token limit reached for gpt-4o-mini ...")`.
        """
        with self._changed:
            b = self._get_batch(batch_id)
            if errors is None:
                if code is None and b.invalid is not None:
                    errors = [dict(b.invalid)]
                else:
                    code = code or "invalid_request"
                    message = message or f"The batch failed ({code})."
                    errors = [{"code": code, "message": message, "param": param, "line": line}]
            b = self._step(batch_id, "failed", allow_invalid=True)
            b.errors = [dict(e) for e in errors]
            self._changed.notify_all()
            return b.view()

    def _get_batch(self, batch_id: str) -> _Batch:
        b = self._batches.get(batch_id)
        if b is None:
            raise KeyError(f"no batch {batch_id!r}")
        return b

    def _step(self, batch_id: str, status: str, *, allow_invalid: bool = False) -> _Batch:
        b = self._get_batch(batch_id)
        if b.status not in _STEPS[status]:
            raise ValueError(f"batch {batch_id} is {b.status}: it cannot become {status}")
        if b.invalid is not None and not allow_invalid:
            raise ValueError(
                f"batch {batch_id} was created on a missing input file: it can only fail "
                f"(remote.fail({batch_id!r}))"
            )
        if b.status == "validating" and status != "failed":
            b.total = len(b.lines or [])
        b.status = status
        b.times[_TIME_FIELD[status]] = int(self.clock())
        return b

    def _results(
        self,
        b: _Batch,
        ran: list[dict[str, Any]],
        unfinished: list[dict[str, Any]],
        unfinished_code: str | None,
        outputs: Mapping[str, dict[str, Any]] | None,
        errors: Mapping[str, ErrorSpec] | None,
        missing: Iterable[str] = (),
    ) -> None:
        outputs, errors, skip = outputs or {}, errors or {}, set(missing)
        out: list[dict[str, Any]] = []
        err: list[dict[str, Any]] = []
        for n, line in enumerate(ran):
            custom_id = line.get("custom_id")
            if custom_id in skip:
                continue
            base = {"id": f"batch_req_{b.id[6:]}_{n}", "custom_id": custom_id}
            request_id = f"req_{b.id[6:]}_{n}"
            spec = errors.get(custom_id) if isinstance(custom_id, str) else None
            if isinstance(spec, int):
                kind = "server_error" if spec >= 500 else "invalid_request_error"
                error = {"message": f"HTTP {spec}", "type": kind, "param": None, "code": None}
                response = {"status_code": spec, "request_id": request_id,
                            "body": {"error": error}}  # fmt: skip
                err.append({**base, "response": response, "error": None})
            elif isinstance(spec, str):
                err.append({**base, "response": None, "error": {"code": spec, "message": spec}})
            else:
                chosen = outputs.get(custom_id) if isinstance(custom_id, str) else None
                answer = chosen if chosen is not None else self.responder(line)
                response = {"status_code": 200, "request_id": request_id, "body": answer}
                out.append({**base, "response": response, "error": None})
        for n, line in enumerate(unfinished, len(ran)):
            assert unfinished_code is not None
            message = UNFINISHED_MESSAGES[unfinished_code]
            err.append(
                {
                    "id": f"batch_req_{b.id[6:]}_{n}",
                    "custom_id": line.get("custom_id"),
                    "response": None,
                    "error": {"code": unfinished_code, "message": message},
                }
            )
        b.completed, b.failed = len(out), len(err)
        b.usage = {
            "input_tokens": sum(len(json.dumps(line.get("body"))) // 4 for line in ran),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 2 * len(out),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 0,
        }
        b.usage["total_tokens"] = b.usage["input_tokens"] + b.usage["output_tokens"]
        expires = (
            b.times[_TIME_FIELD[b.status]] + b.output_expires_after
            if b.output_expires_after
            else None
        )
        if out:
            b.output_file_id = self._new_file(
                f"batch_{b.id}_output.jsonl", "batch_output", _jsonl(out), expires
            ).id
        if err:
            b.error_file_id = self._new_file(
                f"batch_{b.id}_error.jsonl", "batch_output", _jsonl(err), expires
            ).id

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):024x}"

    def _new_file(
        self, filename: str, purpose: str, content: bytes, expires_at: int | None
    ) -> _File:
        f = _File(self._new_id("file-"), filename, purpose, content, int(self.clock()), expires_at)
        self._files[f.id] = f
        return f

    def _get_file(self, file_id: str) -> _File:
        f = self._files.get(file_id)
        if f is None or (f.expires_at is not None and self.clock() >= f.expires_at):
            raise _error(404, f"No such File object: {file_id}", param="id")
        return f

    # -- the Provider protocol ----------------------------------------------------------------

    def upload_file(
        self,
        path: Path,
        filename: str,
        *,
        purpose: str = "batch",
        expires_after: int | None = None,
    ) -> RemoteFile:
        def effect() -> RemoteFile:
            content = Path(path).read_bytes()  # OSError, as the HTTP client raises it
            if purpose == "batch" and not filename.endswith(".jsonl"):
                raise _error(400, "Batch input files must be .jsonl", code="invalid_file_format")
            if len(content) > MAX_FILE_BYTES:
                raise _error(400, "File is larger than 200 MB", code="file_too_large")
            _check_expiry(expires_after, "expires_after[seconds]")
            created = int(self.clock())
            expires = created + int(expires_after) if expires_after else None
            return self._new_file(filename, purpose, content, expires).view()

        args = {"path": path, "filename": filename, "purpose": purpose,
                "expires_after": expires_after}  # fmt: skip
        return self._call("upload_file", args, effect)  # type: ignore[no-any-return]

    def retrieve_file(self, file_id: str) -> RemoteFile:
        return self._call(  # type: ignore[no-any-return]
            "retrieve_file", {"file_id": file_id}, lambda: self._get_file(file_id).view()
        )

    def download_file(self, file_id: str, dest: Path, *, expected_bytes: int | None = None) -> int:
        def effect() -> int:
            content = self._get_file(file_id).content
            if expected_bytes is not None and expected_bytes != len(content):
                raise IncompleteDownloadError(
                    f"expected {expected_bytes} bytes, the file has {len(content)}"
                )
            target = Path(dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_suffix(target.suffix + ".part")
            part.write_bytes(content)
            os.replace(part, target)
            return len(content)

        args = {"file_id": file_id, "dest": dest, "expected_bytes": expected_bytes}
        return self._call("download_file", args, effect)  # type: ignore[no-any-return]

    def delete_file(self, file_id: str) -> None:
        # Already gone is what was wanted, as with the HTTP client.
        self._call("delete_file", {"file_id": file_id}, lambda: self._files.pop(file_id, None))

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str],
        output_expires_after: int | None,
    ) -> RemoteBatch:
        def effect() -> RemoteBatch:
            if endpoint not in ENDPOINTS:
                raise _error(400, f"Invalid value for 'endpoint': '{endpoint}'.",
                             code="invalid_value", param="endpoint")  # fmt: skip
            if completion_window != "24h":
                raise _error(400, f"Invalid value for 'completion_window': '{completion_window}'.",
                             code="invalid_value", param="completion_window")  # fmt: skip
            _check_metadata(metadata)
            _check_expiry(output_expires_after, "output_expires_after")
            created = int(self.clock())
            b = _Batch(
                id=self._new_id("batch_"),
                endpoint=endpoint,
                input_file_id=input_file_id,
                completion_window=completion_window,
                metadata=dict(metadata or {}),
                output_expires_after=int(output_expires_after) if output_expires_after else None,
                created_at=created,
                expires_at=created + COMPLETION_WINDOW_SECONDS,
            )
            try:
                b.lines = _requests(self._get_file(input_file_id).content)
            except NotFoundError:
                # As the real remote does: the create succeeds, validation fails later.
                b.invalid = {
                    "code": "file_not_found",
                    "message": f"The input file '{input_file_id}' could not be found.",
                    "param": "input_file_id",
                    "line": None,
                }
            if b.lines:
                model = (b.lines[0].get("body") or {}).get("model")
                b.model = str(model) if model is not None else None
            self._batches[b.id] = b
            answer = b.view()
            if self.auto_complete:
                if b.invalid is not None:
                    self.fail(b.id)
                else:
                    self.complete(b.id)
            return answer

        args = {"input_file_id": input_file_id, "endpoint": endpoint,
                "completion_window": completion_window, "metadata": dict(metadata or {}),
                "output_expires_after": output_expires_after}  # fmt: skip
        return self._call("create_batch", args, effect)  # type: ignore[no-any-return]

    def retrieve_batch(self, batch_id: str) -> RemoteBatch:
        return self._call(  # type: ignore[no-any-return]
            "retrieve_batch", {"batch_id": batch_id}, lambda: self._lookup(batch_id).view()
        )

    def _lookup(self, batch_id: str) -> _Batch:
        b = self._batches.get(batch_id)
        if b is None:
            raise _error(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return b

    def list_batches(self, *, after: str | None = None, limit: int = 100) -> BatchPage:
        return self._call(  # type: ignore[no-any-return]
            "list_batches", {"after": after, "limit": limit}, lambda: self._page(after, limit)
        )

    def _page(self, after: str | None, limit: int) -> BatchPage:
        oldest_first = list(self._batches)  # ids; only the page's batches are viewed
        end = len(oldest_first)  # the page ends (newest first) just before this position
        if after is not None:
            if after not in self._batches:
                return BatchPage(data=[], has_more=False)
            end = oldest_first.index(after)
        limit = max(1, min(int(limit), 100))
        page = oldest_first[max(0, end - limit) : end]
        data = [self._batches[batch_id].view() for batch_id in reversed(page)]
        return BatchPage(
            data=data,
            has_more=end - limit > 0,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    def find_batch_by_metadata(
        self,
        key: str,
        value: str,
        *,
        created_after: int | None = None,
        max_pages: int = 50,
    ) -> RemoteBatch | None:
        def effect() -> RemoteBatch | None:
            # Newest first, stopping at the first batch created before `created_after`, and
            # looking at most `max_pages` pages of 100 deep: what the HTTP client does.
            for b in list(reversed(self._batches.values()))[: max_pages * 100]:
                if created_after is not None and b.created_at < created_after:
                    return None
                if b.metadata.get(key) == value:
                    return b.view()
            return None

        args = {"key": key, "value": value, "created_after": created_after,
                "max_pages": max_pages}  # fmt: skip
        return self._call("find_batch_by_metadata", args, effect)  # type: ignore[no-any-return]

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        def effect() -> RemoteBatch:
            b = self._lookup(batch_id)
            if b.status in ("validating", "in_progress"):
                self._step(batch_id, "cancelling", allow_invalid=True)
            elif b.status not in ("cancelling", "cancelled"):  # a second cancel is accepted
                raise _error(409, f"Cannot cancel a batch with status '{b.status}'.")
            return b.view()

        return self._call("cancel_batch", {"batch_id": batch_id}, effect)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)


def _requests(content: bytes) -> list[dict[str, Any]]:
    """The request lines of an input file (lines that are not JSON objects are skipped)."""
    out = []
    for raw in content.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    metadata = metadata or {}
    if len(metadata) > 16:
        raise _error(400, "metadata holds at most 16 pairs", code="invalid_value", param="metadata")
    for k, v in metadata.items():
        if not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise _error(400, f"invalid metadata pair {k!r}", code="invalid_value",
                         param="metadata")  # fmt: skip


def _check_expiry(seconds: int | None, param: str) -> None:
    if seconds is not None and not 3600 <= int(seconds) <= 2592000:
        raise _error(400, f"{param} must be between 3600 and 2592000", code="invalid_value",
                     param=param)  # fmt: skip
