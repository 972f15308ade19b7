"""The remote API behind one small protocol: value types, errors, and `Provider`.

Everything here is provider-neutral. The value types are parsed tolerantly (missing or null
fields become defaults) because OpenAI-compatible servers differ in what they fill in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable


def _int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0

    @classmethod
    def from_api(cls, d: Any) -> RequestCounts:
        if not isinstance(d, dict):
            return cls()
        return cls(
            total=_int_or_none(d.get("total")) or 0,
            completed=_int_or_none(d.get("completed")) or 0,
            failed=_int_or_none(d.get("failed")) or 0,
        )


@dataclass(frozen=True)
class RemoteFile:
    id: str
    bytes: int
    filename: str
    purpose: str
    status: str | None = None
    created_at: int | None = None
    expires_at: int | None = None

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> RemoteFile:
        return cls(
            id=str(d.get("id") or ""),
            bytes=_int_or_none(d.get("bytes")) or 0,
            filename=str(d.get("filename") or ""),
            purpose=str(d.get("purpose") or ""),
            status=_str_or_none(d.get("status")),
            created_at=_int_or_none(d.get("created_at")),
            expires_at=_int_or_none(d.get("expires_at")),
        )


@dataclass(frozen=True)
class RemoteBatch:
    id: str
    status: str
    endpoint: str
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    metadata: dict[str, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    model: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> RemoteBatch:
        metadata = d.get("metadata")
        errors = d.get("errors")
        # The documented shape is {"object": "list", "data": [...]}; a bare list is tolerated.
        if isinstance(errors, dict):
            errors = errors.get("data")
        usage = d.get("usage")
        return cls(
            id=str(d.get("id") or ""),
            status=str(d.get("status") or ""),
            endpoint=str(d.get("endpoint") or ""),
            input_file_id=str(d.get("input_file_id") or ""),
            output_file_id=_str_or_none(d.get("output_file_id")) or None,
            error_file_id=_str_or_none(d.get("error_file_id")) or None,
            created_at=_int_or_none(d.get("created_at")),
            in_progress_at=_int_or_none(d.get("in_progress_at")),
            expires_at=_int_or_none(d.get("expires_at")),
            finalizing_at=_int_or_none(d.get("finalizing_at")),
            completed_at=_int_or_none(d.get("completed_at")),
            failed_at=_int_or_none(d.get("failed_at")),
            expired_at=_int_or_none(d.get("expired_at")),
            cancelling_at=_int_or_none(d.get("cancelling_at")),
            cancelled_at=_int_or_none(d.get("cancelled_at")),
            request_counts=RequestCounts.from_api(d.get("request_counts")),
            metadata=(
                {str(k): str(v) for k, v in metadata.items() if v is not None}
                if isinstance(metadata, dict)
                else {}
            ),
            errors=[e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else [],
            usage=usage if isinstance(usage, dict) else None,
            model=_str_or_none(d.get("model")),
            raw=d,
        )


@dataclass(frozen=True)
class BatchPage:
    data: list[RemoteBatch]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class RemoteError(Exception):
    """A remote call failed. `retryable` tells whether trying again later may succeed."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type
        self.param = param
        self.request_id = request_id
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.code:
            parts.append(f"code={self.code}")
        if self.param:
            parts.append(f"param={self.param}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        return " ".join(parts)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.message!r}, status={self.status!r}, code={self.code!r})"


class TransientRemoteError(RemoteError):
    """A retryable failure that outlasted the retries; try again later.

    `maybe_created` is set when a non-idempotent create may have reached the server before the
    failure (timeout or dropped connection after sending): the caller must look the object up
    (`find_batch_by_metadata`) before creating it again.
    """

    retryable = True

    def __init__(self, message: str, *, maybe_created: bool = False, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.maybe_created = maybe_created


class PermanentRemoteError(RemoteError):
    """The remote refused the request and will refuse it again (400, 401, 403, 404, 422...)."""

    retryable = False


class NotFoundError(PermanentRemoteError):
    """404: the batch or file does not exist (or no longer does)."""


class IncompleteDownloadError(TransientRemoteError):
    """A download ended short of (or past) the expected size on every attempt."""


@runtime_checkable
class Provider(Protocol):
    """One remote Batch/Files API. Implementations are thread-safe."""

    name: str
    max_requests_per_file: int

    @property
    def max_call_seconds(self) -> float:
        """The longest a `create_batch` call can take, retries included: a daemon starts a
        create only while its lease on the batch outlives it."""
        ...

    def upload_file(
        self,
        path: Path,
        filename: str,
        *,
        purpose: str = "batch",
        expires_after: int | None = None,
    ) -> RemoteFile: ...

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str],
        output_expires_after: int | None,
    ) -> RemoteBatch: ...

    def retrieve_batch(self, batch_id: str) -> RemoteBatch: ...

    def list_batches(self, *, after: str | None = None, limit: int = 100) -> BatchPage: ...

    def find_batch_by_metadata(
        self,
        key: str,
        value: str,
        *,
        created_after: int | None = None,
        max_pages: int = 50,
    ) -> RemoteBatch | None: ...

    def cancel_batch(self, batch_id: str) -> RemoteBatch: ...

    def retrieve_file(self, file_id: str) -> RemoteFile: ...

    def download_file(
        self, file_id: str, dest: Path, *, expected_bytes: int | None = None
    ) -> int: ...

    def delete_file(self, file_id: str) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
