"""OpenAI (and OpenAI-compatible) Batch and Files API over a sync `httpx.Client`.

Retries follow the official SDK: 408, 409, 429, 5xx, timeouts and connection errors are retried
with capped exponential backoff and jitter; `x-should-retry` overrides the status; `retry-after-ms`
/ `Retry-After` are honoured when 0 < value <= 120 s.

Two deliberate departures from the SDK:

* 409 is retried only when it looks like a transient conflict (a lock). A 409 from
  `POST /batches/{id}/cancel` ("Cannot cancel a batch with status 'completed'.") and any 409
  of type `invalid_request_error` describe the state of the object, which a retry will not
  change, so they raise `PermanentRemoteError` at once, whatever `x-should-retry` says.
* `POST /batches` is not idempotent. It is retried only when the server certainly did not act
  on it (the connection was never made, or the server answered 408/409/429/500/503). After a
  failure that may have happened once the request was sent (read/write timeout, dropped
  connection, 502/504 from a gateway whose upstream may have acted) it raises
  `TransientRemoteError(maybe_created=True)`: the caller looks the batch up by metadata.

A create is also bounded in time: `max_call_seconds` is the longest it can take, retries
included (each of the `max_retries + 1` attempts waits at most the connect timeout and the
request timeout, and the retries sleep `max_retries * 8` s at most between them). A retry whose
sleep would pass that (a long `Retry-After`) is not made: the create gives up with a
`TransientRemoteError`, as after its last retry. A daemon starts a create only while its lease
on the batch outlives `max_call_seconds`, so that no other daemon takes the batch over while the
create may still take effect.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import random
import time
from collections.abc import Callable, Generator, Mapping
from datetime import UTC
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote

import httpx
import orjson
import structlog

from jobqueue.remote.base import (
    BatchPage,
    IncompleteDownloadError,
    NotFoundError,
    PermanentRemoteError,
    RemoteBatch,
    RemoteError,
    RemoteFile,
    TransientRemoteError,
)
from jobqueue.version import __version__

log = structlog.get_logger("jobqueue.remote")

OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_USER_AGENT = f"jobqueue/{__version__} httpx/{httpx.__version__}"

_CHUNK = 1 << 20  # download writes: 1 MiB
_MAX_RETRY_AFTER = 120.0
_INITIAL_DELAY = 0.5
_MAX_DELAY = 8.0
# Errors raised before any byte of the request left: always safe to retry, even a create.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# A body that fails to decode is treated like a corrupt transfer.
_RETRYABLE_EXC = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
    httpx.DecodingError,
)
# Gateway answers: the upstream may have acted before the gateway gave up.
_AMBIGUOUS_STATUS = frozenset({502, 504})


class _KeyAuth(httpx.Auth):
    """Adds the key per request, so it never sits in the client's default headers."""

    def __init__(self, header: str, prefix: str, key: str) -> None:
        self._header = header
        self._prefix = prefix
        self._key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self._header] = f"{self._prefix}{self._key}"
        yield request

    def __repr__(self) -> str:
        return f"_KeyAuth(header={self._header!r}, key=<redacted>)"


class _Retry(Exception):
    """Internal: one download attempt failed in a way another attempt may fix."""

    def __init__(self, error: RemoteError, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.headers = headers


def _q(ident: str) -> str:
    # Ids go into paths; quoting keeps a strange id from reaching another endpoint.
    return quote(ident, safe="")


def _parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        raw = headers.get(name)
        if raw:
            try:
                return float(raw) / 1000.0
            except ValueError:
                pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now


class OpenAIProvider:
    """The OpenAI Batch/Files API at `base_url` (up to and including `/v1`). Thread-safe."""

    name = "openai"
    max_requests_per_file = 50_000

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key or None
        self._max_retries = max(0, int(max_retries))
        self._sleep = sleep
        self._rng = rng or random.Random()
        connect = min(timeout, 10.0)
        self._attempt_seconds = connect + float(timeout)
        self._timeout = httpx.Timeout(timeout, connect=connect)
        # Big files: the server may take a while between chunks and to answer an upload.
        long = max(timeout, 300.0)
        self._transfer_timeout = httpx.Timeout(long, connect=connect, pool=timeout)
        self._client = httpx.Client(
            base_url=self.base_url + "/",
            auth=self._auth(),
            timeout=self._timeout,
            transport=transport,
            headers={"User-Agent": user_agent, "Accept": "application/json"},
            follow_redirects=False,
        )

    @property
    def max_call_seconds(self) -> float:
        """The longest a create can take, retries and their sleeps included (see the module
        docstring): what a daemon's lease must outlive when it starts one."""
        return (self._max_retries + 1) * self._attempt_seconds + self._sleep_budget

    @property
    def _sleep_budget(self) -> float:
        return self._max_retries * _MAX_DELAY

    # -- plumbing ---------------------------------------------------------------------------

    def _auth(self) -> httpx.Auth | None:
        return _KeyAuth("Authorization", "Bearer ", self._api_key) if self._api_key else None

    def _params(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """Query parameters for every request (Azure adds `api-version`)."""
        return params

    def _request_id(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("x-request-id") or headers.get("apim-request-id")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _redact(self, text: str) -> str:
        # Some proxies echo the credential back in their error text.
        if self._api_key and self._api_key in text:
            return text.replace(self._api_key, "<redacted>")
        return text

    def _retry_delay(self, attempt: int, headers: Mapping[str, str] | None) -> float:
        if headers is not None:
            after = _parse_retry_after(headers, time.time())
            if after is not None and 0 < after <= _MAX_RETRY_AFTER:
                return after
        base = min(_INITIAL_DELAY * 2.0**attempt, _MAX_DELAY)
        return base * (1 - 0.25 * self._rng.random())

    def _error(self, response: httpx.Response, cls: type[RemoteError], **extra: Any) -> RemoteError:
        body: Any = None
        with contextlib.suppress(orjson.JSONDecodeError, ValueError):
            body = orjson.loads(response.content)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or "")
            code, etype, param = err.get("code"), err.get("type"), err.get("param")
        else:
            # Non-JSON (a proxy's HTML page) or an unusual shape: keep a short excerpt.
            message = err if isinstance(err, str) else response.text[:200].strip()
            code = etype = param = None
        status = response.status_code
        if cls is PermanentRemoteError and status == 404:
            cls = NotFoundError
        return cls(
            self._redact(message or f"HTTP {status} {response.reason_phrase}".strip()),
            status=status,
            code=None if code is None else str(code),
            type=None if etype is None else str(etype),
            param=None if param is None else str(param),
            request_id=self._request_id(response.headers),
            **extra,
        )

    @staticmethod
    def _should_retry(response: httpx.Response, error: RemoteError, *, cancel: bool) -> bool:
        status = response.status_code
        # The object's state conflicts with the request: retrying cannot change that.
        if status == 409 and (cancel or error.type == "invalid_request_error"):
            return False
        should = response.headers.get("x-should-retry", "").lower()
        if should == "true":
            return True
        if should == "false":
            return False
        return status in (408, 409, 429) or status >= 500

    def _full_path(self, path: str) -> str:
        return self._client.base_url.path + path

    def _log(self, event: str, level: str, **kw: Any) -> None:
        if "path" in kw:
            kw["path"] = self._full_path(kw["path"])
        getattr(log, level)(event, provider=self.name, **kw)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: dict[str, str] | None = None,
        files: Callable[[contextlib.ExitStack[Any]], dict[str, Any]] | None = None,
        idempotent: bool = True,
        cancel: bool = False,
        timeout: httpx.Timeout | None = None,
        bounded: bool = False,
    ) -> httpx.Response:
        """One call with retries. `files` builds fresh multipart parts for each attempt.
        `bounded`: the retries' sleeps stay within the budget of `max_call_seconds`."""
        content = orjson.dumps(json) if json is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        slept = 0.0
        for attempt in range(self._max_retries + 1):
            last = attempt >= self._max_retries
            started = time.monotonic()
            try:
                with contextlib.ExitStack() as stack:
                    response = self._client.request(
                        method,
                        path,
                        params=self._params(params),
                        content=content,
                        headers=headers,
                        data=data,
                        files=files(stack) if files else None,
                        timeout=timeout or self._timeout,
                    )
            except httpx.RequestError as exc:
                fields = dict(
                    method=method,
                    path=path,
                    status=None,
                    attempt=attempt,
                    request_id=None,
                    error=type(exc).__name__,
                )
                message = self._redact(
                    f"{method} {self._full_path(path)}: {type(exc).__name__}: {exc}"
                )
                if not isinstance(exc, _RETRYABLE_EXC):
                    self._log("remote.failed", "error", **fields)
                    raise PermanentRemoteError(message) from exc
                if not idempotent and not isinstance(exc, _NOT_SENT):
                    self._log("remote.maybe_created", "warning", **fields)
                    raise TransientRemoteError(message, maybe_created=True) from exc
                delay = self._retry_delay(attempt, None)
                if last or (bounded and slept + delay > self._sleep_budget):
                    self._log("remote.failed", "warning", **fields)
                    raise TransientRemoteError(message) from exc
                self._log("remote.retry", "warning", delay=round(delay, 3), **fields)
                self._sleep(delay)
                slept += delay
                continue

            status = response.status_code
            fields = dict(
                method=method,
                path=path,
                status=status,
                attempt=attempt,
                request_id=self._request_id(response.headers),
                elapsed_ms=round((time.monotonic() - started) * 1000),
            )
            if response.is_success:
                self._log("remote.request", "debug", **fields)
                return response
            probe = self._error(response, RemoteError)
            retry = self._should_retry(response, probe, cancel=cancel)
            fields.update(code=probe.code, type=probe.type)
            if retry and not idempotent and status in _AMBIGUOUS_STATUS:
                self._log("remote.maybe_created", "warning", **fields)
                raise self._error(response, TransientRemoteError, maybe_created=True)
            if not retry:
                self._log("remote.refused", "info" if status == 404 else "warning", **fields)
                raise self._error(response, PermanentRemoteError)
            delay = self._retry_delay(attempt, response.headers)
            if last or (bounded and slept + delay > self._sleep_budget):
                self._log("remote.failed", "warning", **fields)
                raise self._error(response, TransientRemoteError)
            self._log("remote.retry", "warning", delay=round(delay, 3), **fields)
            self._sleep(delay)
            slept += delay
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, response: httpx.Response, *, maybe_created: bool = False) -> dict[str, Any]:
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            # A 2xx that is not our JSON: a proxy or a broken server; worth another try later.
            raise TransientRemoteError(
                f"{response.request.method} {response.request.url.path}: "
                f"unexpected response body ({response.headers.get('content-type')})",
                status=response.status_code,
                request_id=self._request_id(response.headers),
                maybe_created=maybe_created,
            )
        return body

    # -- files ------------------------------------------------------------------------------

    def upload_file(
        self,
        path: Path,
        filename: str,
        *,
        purpose: str = "batch",
        expires_after: int | None = None,
    ) -> RemoteFile:
        data = {"purpose": purpose}
        if expires_after is not None:
            data["expires_after[anchor]"] = "created_at"
            data["expires_after[seconds]"] = str(int(expires_after))

        def parts(stack: contextlib.ExitStack[Any]) -> dict[str, Any]:
            # httpx streams a file object in chunks; reopened per attempt so a retry starts at 0.
            fh: IO[bytes] = stack.enter_context(open(path, "rb"))  # noqa: SIM115
            return {"file": (filename, fh, "application/jsonl")}

        # A retried upload may leave a duplicate remote file: wasteful, harmless.
        response = self._request(
            "POST", "files", data=data, files=parts, timeout=self._transfer_timeout
        )
        return RemoteFile.from_api(self._json(response))

    def retrieve_file(self, file_id: str) -> RemoteFile:
        return RemoteFile.from_api(self._json(self._request("GET", f"files/{_q(file_id)}")))

    def delete_file(self, file_id: str) -> None:
        with contextlib.suppress(NotFoundError):  # already gone: what we wanted
            self._request("DELETE", f"files/{_q(file_id)}")

    def download_file(self, file_id: str, dest: Path, *, expected_bytes: int | None = None) -> int:
        """Stream the file's content to `dest` atomically; return the byte count.

        Writes to `<dest>.part`, checks the size, fsyncs, renames. A short read is resumed with
        a Range request when the server honours it, else restarted. On failure neither `dest`
        nor the `.part` file is left behind.
        """
        if expected_bytes is None:
            expected_bytes = self.retrieve_file(file_id).bytes
        dest = Path(dest)
        part = dest.with_suffix(dest.suffix + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        path = f"files/{_q(file_id)}/content"
        part.unlink(missing_ok=True)  # a leftover from a crash: unknown content
        try:
            for attempt in range(self._max_retries + 1):
                try:
                    total = self._download_once(path, part, expected_bytes, attempt)
                except _Retry as retry:
                    err = retry.error
                    fields = dict(
                        method="GET",
                        path=path,
                        status=err.status,
                        attempt=attempt,
                        request_id=err.request_id,
                        error=err.message,
                    )
                    if attempt >= self._max_retries:
                        self._log("remote.failed", "warning", **fields)
                        raise err from retry.__cause__
                    delay = self._retry_delay(attempt, retry.headers)
                    self._log("remote.retry", "warning", delay=round(delay, 3), **fields)
                    self._sleep(delay)
                    continue
                os.replace(part, dest)
                _fsync_dir(dest.parent)
                return total
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def _download_once(self, path: str, part: Path, expected: int, attempt: int) -> int:
        offset = part.stat().st_size if part.exists() else 0
        if offset >= expected:
            part.unlink(missing_ok=True)
            offset = 0
        # identity: byte counts then mean the same thing on the wire and on disk.
        headers = {"Accept-Encoding": "identity", "Accept": "*/*"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        started = time.monotonic()
        request_id: str | None = None
        try:
            with self._client.stream(
                "GET",
                path,
                params=self._params(None),
                headers=headers,
                timeout=self._transfer_timeout,
            ) as response:
                request_id = self._request_id(response.headers)
                status = response.status_code
                if not response.is_success:
                    response.read()
                    probe = self._error(response, RemoteError)
                    if self._should_retry(response, probe, cancel=False):
                        raise _Retry(self._error(response, TransientRemoteError), response.headers)
                    self._log(
                        "remote.refused",
                        "warning",
                        method="GET",
                        path=path,
                        status=status,
                        attempt=attempt,
                        request_id=request_id,
                        code=probe.code,
                    )
                    raise self._error(response, PermanentRemoteError)
                start = 0
                if status == 206 and offset and _range_start(response) == offset:
                    start = offset
                elif status == 206:
                    # A range we did not ask for: drop what we have and start over.
                    part.unlink(missing_ok=True)
                    raise _Retry(self._incomplete("unexpected partial content", status, request_id))
                remaining = expected - start
                length = _content_length(response)
                if length is not None and length != remaining:
                    part.unlink(missing_ok=True)
                    raise _Retry(
                        self._incomplete(
                            f"Content-Length {length} does not match the expected "
                            f"{remaining} bytes",
                            status,
                            request_id,
                        )
                    )
                written = 0
                with open(part, "ab" if start else "wb") as fh:
                    for chunk in response.iter_bytes(chunk_size=_CHUNK):
                        written += len(chunk)
                        if written > remaining:
                            break
                        fh.write(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
                total = start + written
                if written > remaining:
                    part.unlink(missing_ok=True)
                    raise _Retry(
                        self._incomplete(
                            f"received more than the expected {expected} bytes", status, request_id
                        )
                    )
                if total != expected:
                    # Keep the part: the next attempt resumes with a Range request.
                    raise _Retry(
                        self._incomplete(
                            f"received {total} of {expected} bytes", status, request_id
                        )
                    )
        except httpx.RequestError as exc:
            if not isinstance(exc, _RETRYABLE_EXC):
                raise PermanentRemoteError(
                    self._redact(f"GET {self._full_path(path)}: {type(exc).__name__}: {exc}")
                ) from exc
            error = IncompleteDownloadError(
                self._redact(f"GET {self._full_path(path)}: {type(exc).__name__}: {exc}"),
                request_id=request_id,
            )
            raise _Retry(error) from exc
        self._log(
            "remote.download",
            "debug",
            method="GET",
            path=path,
            status=status,
            attempt=attempt,
            request_id=request_id,
            bytes=total,
            resumed_from=start,
            elapsed_ms=round((time.monotonic() - started) * 1000),
        )
        return total

    def _incomplete(self, message: str, status: int, request_id: str | None) -> RemoteError:
        return IncompleteDownloadError(message, status=status, request_id=request_id)

    # -- batches ----------------------------------------------------------------------------

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str],
        output_expires_after: int | None,
    ) -> RemoteBatch:
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": dict(metadata),
        }
        if output_expires_after is not None:
            body["output_expires_after"] = {
                "anchor": "created_at",
                "seconds": int(output_expires_after),
            }
        response = self._request("POST", "batches", json=body, idempotent=False, bounded=True)
        return RemoteBatch.from_api(self._json(response, maybe_created=True))

    def retrieve_batch(self, batch_id: str) -> RemoteBatch:
        return RemoteBatch.from_api(self._json(self._request("GET", f"batches/{_q(batch_id)}")))

    def cancel_batch(self, batch_id: str) -> RemoteBatch:
        # Idempotent remotely (a second cancel is accepted), so retrying is safe.
        response = self._request("POST", f"batches/{_q(batch_id)}/cancel", cancel=True)
        return RemoteBatch.from_api(self._json(response))

    def list_batches(self, *, after: str | None = None, limit: int = 100) -> BatchPage:
        params: dict[str, Any] = {"limit": max(1, min(int(limit), 100))}
        if after:
            params["after"] = after
        body = self._json(self._request("GET", "batches", params=params))
        data = body.get("data")
        batches = [RemoteBatch.from_api(b) for b in data if isinstance(b, dict)] if data else []
        first_id = body.get("first_id") or (batches[0].id if batches else None)
        last_id = body.get("last_id") or (batches[-1].id if batches else None)
        return BatchPage(
            data=batches,
            has_more=bool(body.get("has_more")),
            first_id=first_id,
            last_id=last_id,
        )

    def find_batch_by_metadata(
        self,
        key: str,
        value: str,
        *,
        created_after: int | None = None,
        max_pages: int = 50,
    ) -> RemoteBatch | None:
        """The newest remote batch whose `metadata[key] == value`, or None.

        Walks list pages newest first and stops at the first batch created before
        `created_after` (remote clock: pass a time with some slack for clock skew).
        """
        after: str | None = None
        for _ in range(max_pages):
            page = self.list_batches(after=after, limit=100)
            for batch in page.data:
                if (
                    created_after is not None
                    and batch.created_at is not None
                    and batch.created_at < created_after
                ):
                    return None
                if batch.metadata.get(key) == value:
                    return batch
            if not page.has_more or not page.last_id or page.last_id == after:
                return None
            after = page.last_id
        self._log("remote.find_gave_up", "warning", key=key, pages=max_pages)
        return None


def _content_length(response: httpx.Response) -> int | None:
    if response.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
        return None  # the length of the encoded body, not of what we write
    raw = response.headers.get("content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _range_start(response: httpx.Response) -> int | None:
    # "Content-Range: bytes 100-199/200"
    raw = response.headers.get("content-range", "")
    unit, _, spec = raw.partition(" ")
    if unit.lower() != "bytes":
        return None
    first, _, _ = spec.partition("-")
    try:
        return int(first)
    except ValueError:
        return None


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not every platform lets one open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
