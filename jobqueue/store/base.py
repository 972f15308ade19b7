"""The database: engines, sessions, migrations, compare-and-set transitions and leases.

All SQL lives here. The rest of jobqueue asks the store to apply an edge; the store applies it as
`UPDATE … WHERE id = :id AND status = :from` and writes the event into the outbox in the same
transaction, so two daemons can never both apply one edge and no change goes unannounced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from jobqueue.core.states import (
    BATCH_MACHINE,
    BATCH_REMOTE_OPEN,
    BATCH_TERMINAL,
    BATCH_TIME_COLUMN,
    JOB_MACHINE,
    BatchStatus,
    IllegalTransition,
    JobStatus,
)
from jobqueue.files.sharing import create_with_umask
from jobqueue.logs import get_logger
from jobqueue.store import coordination, events
from jobqueue.store.batches import Lease, held, insert_queued_batches, new_lease_token
from jobqueue.store.batches import next_batch_number as _next_batch_number
from jobqueue.store.batches import release as _release
from jobqueue.store.tables import (
    batches_table,
    events_table,
    jobs_table,
    outcomes_table,
    requests_table,
)

log = get_logger("jobqueue.store")

SQLITE_BUSY_TIMEOUT_MS = 60_000


class StoreError(Exception):
    """The database cannot be opened or used."""


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE is ours to issue.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        # 16 MB of page cache (the default is 2 MB): a million-row intake or collection
        # otherwise spills the same index pages to the WAL again and again.
        cur.execute("PRAGMA cache_size = -16384")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that later upgrades to a
        # writer fails at once with "database is locked" instead of waiting its busy timeout.
        readonly = conn.get_execution_options().get("jobqueue_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


class Store:
    """One database, SQLite or PostgreSQL, shared by the CLI, the embedded API and daemons."""

    def __init__(self, url: str, *, migrate: bool = True, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database in ("", ":memory:"):
                raise StoreError("an in-memory SQLite database cannot be shared; give a file path")
            path = Path(database).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            create_with_umask(path)  # not SQLite's fixed 0644: see files.sharing
            self.engine = create_engine(
                url,
                echo=echo,
                # One connection per checkout: SQLite connections are cheap and this keeps WAL
                # checkpoints moving; threads never share a connection.
                poolclass=NullPool,
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            )
            _configure_sqlite(self.engine)
            self._write_lock: AbstractContextManager[Any] = threading.RLock()
        elif self.dialect == "postgresql":
            self.engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10)
            self._write_lock = nullcontext()
        else:
            raise StoreError(
                f"unsupported database {self.dialect!r}: use sqlite:/// or postgresql+psycopg://"
            )
        if migrate:
            from jobqueue.store.migrate import upgrade_if_behind

            try:
                upgrade_if_behind(self)
            except Exception as exc:
                raise StoreError(
                    f"cannot open database {parsed.render_as_string()}: {exc}"
                ) from exc

    def close(self) -> None:
        self.engine.dispose()
        coordination.dispose(self)

    # -- transactions -----------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on any exception.

        On SQLite the threads of one process queue on a lock for the write lock: they are woken
        the moment it is free, where SQLite's busy handler would poll with sleeps of up to
        100 ms. Other processes still wait in the busy handler.
        """
        with self.writer_connection() as conn, conn.begin():
            coordination.clear_wakes(conn)
            yield conn
            # The notification of the duties it gave work to goes out with the commit.
            coordination.send_wakes(conn)

    @contextmanager
    def writer_connection(self) -> Iterator[Connection]:
        """A connection with this process's write lock held (SQLite), not yet in a transaction."""
        with self._write_lock, self.engine.connect() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction: on SQLite it takes no write lock."""
        with self.engine.connect() as conn:
            conn.execution_options(jobqueue_readonly=True)
            with conn.begin():
                yield conn

    # -- events -----------------------------------------------------------------------------

    def add_event(
        self,
        conn: Connection,
        type_: str,
        *,
        job_id: str | None,
        batch_id: str | None = None,
        from_status: str | None = None,
        to_status: str | None = None,
        data: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> str:
        return events.add_event(
            conn,
            type_,
            job_id=job_id,
            batch_id=batch_id,
            from_status=from_status,
            to_status=to_status,
            data=data,
            now=now,
        )

    # -- compare-and-set transitions --------------------------------------------------------

    def transition_batch(
        self,
        conn: Connection,
        batch_id: str,
        source: str,
        dest: str,
        *,
        values: Mapping[str, Any] | None = None,
        at: float | None = None,
        data: Mapping[str, Any] | None = None,
        now: float | None = None,
        lease: Lease | None = None,
    ) -> Row | None:
        """Apply `source -> dest` if the row is still in `source`; return the new row, else None.

        An illegal edge raises `IllegalTransition` before anything is written. `at` is the time
        the remote gives for the change; the local clock stamps it otherwise. With `lease`, the
        change is a lease holder's: it applies only while the batch is still under that lease
        (same owner and token), and changes nothing otherwise.
        """
        _check(BATCH_MACHINE, "batch", batch_id, source, dest)
        now = time.time() if now is None else now
        vals: dict[str, Any] = {"status": dest, "updated_at": now, **(values or {})}
        column = BATCH_TIME_COLUMN.get(dest)  # type: ignore[call-overload]
        if column and vals.get(column) is None:
            vals[column] = at if at is not None else now
        fence = held(lease) if lease is not None else []
        if lease is not None and lease.batch_id != batch_id:
            raise ValueError(f"the lease is on batch {lease.batch_id}, not {batch_id}")
        row = conn.execute(
            update(batches_table)
            .where(batches_table.c.id == batch_id, batches_table.c.status == source, *fence)
            .values(**vals)
            .returning(*batches_table.c)
        ).first()
        if row is None:
            return None
        self.add_event(
            conn,
            f"batch.{dest}",
            job_id=row.job_id,
            batch_id=batch_id,
            from_status=source,
            to_status=dest,
            data={**batch_event_data(row), **(data or {})},
            now=now,
        )
        return row

    def transition_job(
        self,
        conn: Connection,
        job_id: str,
        source: str,
        dest: str,
        *,
        values: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> Row | None:
        """Compare-and-set a job's status, writing `job.<dest>` in the same transaction."""
        _check(JOB_MACHINE, "job", job_id, source, dest)
        now = time.time() if now is None else now
        vals: dict[str, Any] = {"status": dest, "updated_at": now, **(values or {})}
        if JOB_MACHINE.is_terminal(dest):
            vals.setdefault("finished_at", now)
        elif dest == JobStatus.RUNNING:
            vals.setdefault("started_at", now)
        row = conn.execute(
            update(jobs_table)
            .where(jobs_table.c.id == job_id, jobs_table.c.status == source)
            .values(**vals)
            .returning(*jobs_table.c)
        ).first()
        if row is None:
            return None
        self.add_event(
            conn,
            f"job.{dest}",
            job_id=job_id,
            from_status=source,
            to_status=dest,
            data={**job_event_data(row), **(data or {})},
            now=now,
        )
        return row

    # -- intake -----------------------------------------------------------------------------

    def insert_job(
        self, conn: Connection, job: Mapping[str, Any], batches: Iterable[Mapping[str, Any]]
    ) -> None:
        """Insert a job and its queued batches, with `job.queued` and `batch.queued` events."""
        conn.execute(insert(jobs_table).values(**job))
        batch_rows = list(batches)
        now = job["created_at"]
        self.add_event(
            conn,
            "job.queued",
            job_id=job["id"],
            to_status=JobStatus.QUEUED,
            data={
                "request_counts": _counts(job["request_count"], 0, 0),
                "batches": len(batch_rows),
            },
            now=now,
        )
        insert_queued_batches(conn, batch_rows, now=now)

    def next_job_number(self, conn: Connection) -> int:
        """A number for a new job, unique for good. PostgreSQL draws it from a sequence (so
        concurrent intakes never wait on each other); a SQLite writer holds the database's only
        write lock, so the next integer is free until it commits."""
        if self.dialect == "postgresql":
            return int(conn.exec_driver_sql("SELECT nextval('jobs_number_seq')").scalar_one())
        return int(
            conn.execute(select(func.coalesce(func.max(jobs_table.c.number), 0) + 1)).scalar_one()
        )

    def next_batch_number(self, conn: Connection, job_id: str) -> int:
        """A number for a new batch of the job. The job's row is locked first on PostgreSQL, so
        two daemons adding batches to one job take turns (SQLite writers always do)."""
        return _next_batch_number(conn, job_id)

    def insert_requests_json(
        self,
        conn: Connection,
        job_number: int,
        batch_number: int,
        data: str,
        first_position: int | None = None,
    ) -> None:
        """Bulk-insert a batch's request index rows from one JSON text, parsed by the database
        itself: with `first_position`, an array of custom ids at consecutive positions from
        it; without, an array of [position, custom_id] pairs.

        One statement for a whole batch, no Python object per row; SQLite runs it without
        holding the GIL, so another thread keeps validating the input meanwhile.
        """
        columns = "job_number, position, custom_id, batch_number, attempt"
        if self.dialect == "postgresql":
            if first_position is None:
                source = (
                    "SELECT %s, (x ->> 0)::bigint, x ->> 1, %s, 1 "
                    "FROM json_array_elements(%s::json) AS x"
                )
                params: tuple[Any, ...] = (job_number, batch_number, data)
            else:
                source = (
                    "SELECT %s, %s + t.o - 1, t.v, %s, 1 "
                    "FROM json_array_elements_text(%s::json) WITH ORDINALITY AS t(v, o)"
                )
                params = (job_number, first_position, batch_number, data)
        elif first_position is None:
            source = "SELECT ?, value ->> 0, value ->> 1, ?, 1 FROM json_each(?)"
            params = (job_number, batch_number, data)
        else:
            source = "SELECT ?, ? + key, value, ?, 1 FROM json_each(?)"
            params = (job_number, first_position, batch_number, data)
        conn.exec_driver_sql(f"INSERT INTO requests ({columns}) {source}", params)

    # -- queries ----------------------------------------------------------------------------

    def get_job(self, conn: Connection, job_id: str) -> Row | None:
        return conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()

    def find_job(self, conn: Connection, prefix: str) -> Row | None:
        """A job by its id, or by an unambiguous prefix of it (as git does for commits)."""
        row = self.get_job(conn, prefix)
        if row is not None or len(prefix) < 6:
            return row
        rows = conn.execute(
            select(jobs_table).where(jobs_table.c.id.startswith(prefix, autoescape=True)).limit(2)
        ).all()
        return rows[0] if len(rows) == 1 else None

    def list_jobs(
        self, conn: Connection, status: str | None = None, limit: int | None = None
    ) -> list[Row]:
        stmt = select(jobs_table).order_by(jobs_table.c.created_at.desc(), jobs_table.c.id.desc())
        if status:
            stmt = stmt.where(jobs_table.c.status == status)
        if limit:
            stmt = stmt.limit(limit)
        return list(conn.execute(stmt).all())

    def get_batch(self, conn: Connection, batch_id: str) -> Row | None:
        return conn.execute(select(batches_table).where(batches_table.c.id == batch_id)).first()

    def job_batches(self, conn: Connection, job_id: str) -> list[Row]:
        return list(
            conn.execute(
                select(batches_table)
                .where(batches_table.c.job_id == job_id)
                .order_by(batches_table.c.attempt, batches_table.c.shard_index, batches_table.c.id)
            ).all()
        )

    def events(
        self,
        conn: Connection,
        job_id: str | None = None,
        *,
        after_seq: int | None = None,
        limit: int | None = None,
        types: Iterable[str] | None = None,
        newest: bool = False,
    ) -> list[Row]:
        """Events in order of seq; with `limit`, the first `limit` (after `after_seq`), or with
        `newest` the last `limit`, still in order."""
        seq = events_table.c.seq
        stmt = select(events_table).order_by(seq.desc() if newest else seq)
        if job_id:
            stmt = stmt.where(events_table.c.job_id == job_id)
        if after_seq is not None:
            stmt = stmt.where(events_table.c.seq > after_seq)
        if types:
            stmt = stmt.where(events_table.c.type.in_(list(types)))
        if limit:
            stmt = stmt.limit(limit)
        rows = list(conn.execute(stmt).all())
        return rows[::-1] if newest else rows

    # -- claiming work with leases ------------------------------------------------------------

    def take_lease(
        self,
        conn: Connection,
        batch_id: str,
        owner: str,
        *,
        now: float,
        seconds: float,
        status: str | Iterable[str],
        live_owners: Iterable[str] = (),
    ) -> Lease | None:
        """Lease a batch in `status` to `owner` until `now + seconds`, a new token drawn; the
        lease, or None when it is not free.

        A lease is free when it has no owner, or when it has run out and its owner is not one
        of `live_owners` (daemons known alive): a live daemon keeps what it holds even past
        its lease, since it may still be working on it. `owner`'s own lease is free to it once
        it ran out (the new token fences off whatever step of ours still held the old one).
        """
        statuses = [status] if isinstance(status, str) else list(status)
        b = batches_table
        token = new_lease_token()
        until = now + seconds
        result = conn.execute(
            update(b)
            .where(
                b.c.id == batch_id,
                b.c.status.in_(statuses),
                _lease_free(owner, now, live_owners),
            )
            .values(lease_owner=owner, lease_until=until, lease_token=token)
        )
        return Lease(batch_id, owner, token, until) if result.rowcount else None

    def release_lease(self, lease: Lease) -> bool:
        """Give a batch back (a step failed and will be retried), in its own transaction.
        Fenced: False, and nothing changed, when the lease was lost already."""
        with self.write() as conn:
            return _release(conn, lease)

    def release_leases(self, conn: Connection, owner: str) -> int:
        """Give back every batch `owner` holds (a daemon stopping)."""
        b = batches_table
        result = conn.execute(
            update(b)
            .where(b.c.lease_owner == owner)
            .values(lease_owner=None, lease_until=None, lease_token=None)
        )
        return result.rowcount or 0

    def lease_owners(self, conn: Connection) -> list[str]:
        b = batches_table
        return list(
            conn.execute(select(b.c.lease_owner).where(b.c.lease_owner.is_not(None)).distinct())
            .scalars()
            .all()
        )

    def update_batch(self, conn: Connection, batch_id: str, **values: Any) -> None:
        conn.execute(update(batches_table).where(batches_table.c.id == batch_id).values(**values))

    def queued_candidates(self, conn: Connection, now: float, limit: int) -> list[Row]:
        """Queued batches due for submission, oldest job first, of jobs not being cancelled."""
        b, j = batches_table, jobs_table
        return list(
            conn.execute(
                select(b)
                .join(j, j.c.id == b.c.job_id)
                .where(
                    b.c.status == BatchStatus.QUEUED,
                    or_(b.c.not_before.is_(None), b.c.not_before <= now),
                    j.c.cancel_requested.is_(False),
                )
                .order_by(j.c.created_at, b.c.attempt, b.c.shard_index, b.c.id)
                .limit(limit)
            ).all()
        )

    def open_tokens_by_model(self, conn: Connection) -> dict[str | None, int]:
        """Estimated prompt tokens of batches the remote holds open, per model."""
        b = batches_table
        rows = conn.execute(
            select(b.c.model, func.sum(b.c.estimated_tokens))
            .where(b.c.status.in_([BatchStatus.SUBMITTING, *BATCH_REMOTE_OPEN]))
            .group_by(b.c.model)
        ).all()
        return {model: int(total or 0) for model, total in rows}

    def stale_submitting(
        self, conn: Connection, now: float, taker: str, live_owners: Iterable[str] = ()
    ) -> list[Row]:
        """Batches in `submitting` whose lease `taker` may take over (see `take_lease`): to be
        looked up remotely, then adopted or requeued."""
        b = batches_table
        return list(
            conn.execute(
                select(b)
                .where(b.c.status == BatchStatus.SUBMITTING, _lease_free(taker, now, live_owners))
                .order_by(b.c.submitting_at, b.c.id)
            ).all()
        )

    def open_remote_batches(self, conn: Connection) -> list[Row]:
        """Batches the remote holds open, nearest remote deadline first."""
        b = batches_table
        return list(
            conn.execute(
                select(b)
                .where(b.c.status.in_(list(BATCH_REMOTE_OPEN)), b.c.remote_id.is_not(None))
                .order_by(b.c.expires_at.is_(None), b.c.expires_at, b.c.id)
            ).all()
        )

    def cancel_candidates(self, conn: Connection) -> list[Row]:
        b = batches_table
        return list(
            conn.execute(
                select(b).where(
                    b.c.cancel_requested.is_(True),
                    b.c.status.in_([BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]),
                    b.c.remote_id.is_not(None),
                )
            ).all()
        )

    def collectable(self, conn: Connection, now: float, limit: int) -> list[Row]:
        """Remote batches that ended and whose results are not stored yet."""
        b = batches_table
        return list(
            conn.execute(
                select(b)
                .where(
                    b.c.status.in_([s.value for s in BATCH_TERMINAL]),
                    b.c.collected_at.is_(None),
                    b.c.remote_id.is_not(None),
                    or_(b.c.lease_until.is_(None), b.c.lease_until < now),
                )
                .order_by(b.c.updated_at)
                .limit(limit)
            ).all()
        )

    def jobs_with_requests_to_retry(self, conn: Connection) -> list[str]:
        """Jobs with requests waiting for a retry: pending (an outcome row without an outcome)
        in a batch that ended and was collected."""
        r, b, j, o = requests_table, batches_table, jobs_table, outcomes_table
        return list(
            conn.execute(
                select(j.c.id)
                .join(o, o.c.job_number == j.c.number)
                .join(r, and_(r.c.job_number == o.c.job_number, r.c.position == o.c.position))
                .join(b, and_(b.c.job_id == j.c.id, b.c.number == r.c.batch_number))
                .where(
                    o.c.outcome.is_(None),
                    b.c.collected_at.is_not(None),
                    j.c.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                )
                .distinct()
            )
            .scalars()
            .all()
        )

    def add_job_counts(self, conn: Connection, job_id: str, succeeded: int, failed: int) -> None:
        if not succeeded and not failed:
            return
        j = jobs_table
        conn.execute(
            update(j)
            .where(j.c.id == job_id)
            .values(
                requests_succeeded=j.c.requests_succeeded + succeeded,
                requests_failed=j.c.requests_failed + failed,
            )
        )

    def unsettled_batches(self, conn: Connection, job_id: str) -> int:
        b = batches_table
        return conn.execute(
            select(func.count())
            .select_from(b)
            .where(
                b.c.job_id == job_id,
                ~and_(
                    b.c.status.in_([s.value for s in BATCH_TERMINAL]), b.c.collected_at.is_not(None)
                ),
            )
        ).scalar_one()


def _lease_free(taker: str, now: float, live_owners: Iterable[str]) -> Any:
    """A batch lease `taker` may take: no owner, or run out and not held by a live daemon
    other than `taker`."""
    b = batches_table
    others_alive = sorted(set(live_owners) - {taker})
    run_out = or_(b.c.lease_until.is_(None), b.c.lease_until < now)
    if not others_alive:
        return or_(b.c.lease_owner.is_(None), run_out)
    return or_(b.c.lease_owner.is_(None), and_(run_out, b.c.lease_owner.not_in(others_alive)))


def _check(machine: Any, kind: str, row_id: str, source: str, dest: str) -> None:
    try:
        machine.check(source, dest)
    except IllegalTransition:
        log.warning("illegal transition refused", kind=kind, id=row_id, source=source, dest=dest)
        raise


def _counts(total: int, completed: int, failed: int) -> dict[str, int]:
    return {"total": total, "completed": completed, "failed": failed}


def batch_event_data(row: Row) -> dict[str, Any]:
    """The small data object of a batch event: counts, remote ids and file ids, never a secret."""
    data: dict[str, Any] = {
        "attempt": row.attempt,
        "shard_index": row.shard_index,
        "model": row.model,
        "remote_id": row.remote_id,
        "input_file_id": row.input_file_id,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "request_counts": _counts(
            row.remote_total or row.request_count, row.remote_completed, row.remote_failed
        ),
    }
    if row.last_error:
        data["error"] = row.last_error
    return data


def job_event_data(row: Row) -> dict[str, Any]:
    data: dict[str, Any] = {
        "request_counts": _counts(row.request_count, row.requests_succeeded, row.requests_failed),
    }
    if row.error:
        data["error"] = row.error
    return data
