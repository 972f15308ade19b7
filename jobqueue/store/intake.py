"""Writing a job's request index while its input is still being validated.

Validation and sharding are one core's work in Python; writing the request index is the
database's (SQLite runs the bulk insert without the GIL, PostgreSQL in its own process). So each
shard's rows are inserted by a thread of their own as soon as the shard is complete, inside the
intake's one transaction: a refused file rolls everything back, and the whole submit costs little
more than validation alone.
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType

from sqlalchemy import Connection

from jobqueue.files.inputs import Shard, shard_request_json
from jobqueue.store import Store


def batch_number_for(shard: Shard) -> int:
    """A first-attempt batch is numbered after its shard: 1, 2, 3… in input order."""
    return shard.index + 1


class RequestIndexLoader:
    """Inserts the request index rows of each shard handed to `add`, in a background thread,
    on `conn` (which the caller must not use until `finish` or `abort` returned)."""

    def __init__(self, store: Store, conn: Connection, job_number: int) -> None:
        self._store = store
        self._conn = conn
        self._job_number = job_number
        self._shards: queue.SimpleQueue[Shard | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="jobqueue-intake", daemon=True)
        self._thread.start()

    def add(self, shard: Shard) -> None:
        """Queue a complete shard; re-raise at once an error the thread already met, so a
        database failure stops the intake early."""
        if self._error is not None:
            raise self._error
        self._shards.put(shard)

    def finish(self) -> None:
        """Wait until every queued shard is in; raise what went wrong, if anything did."""
        self._shards.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Skip what is still queued and wait for the thread (the caller rolls back)."""
        self._stopping = True
        self._shards.put(None)
        self._thread.join()

    def __enter__(self) -> RequestIndexLoader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread.is_alive():
            if exc_type is None:
                self.finish()
            else:
                self.abort()

    def _run(self) -> None:
        while (shard := self._shards.get()) is not None:
            if self._stopping or self._error is not None:
                continue
            try:
                data, first_position = shard_request_json(shard)
                self._store.insert_requests_json(
                    self._conn, self._job_number, batch_number_for(shard), data, first_position
                )
            except BaseException as exc:  # handed to the intake thread, which re-raises it
                self._error = exc
