"""The database: engines, sessions, migrations, compare-and-set transitions and leases.

All SQL lives here. The rest of jobqueue asks the store to apply an edge; the store applies it as
`UPDATE … WHERE id = :id AND status = :from` and writes the event into the outbox in the same
transaction, so two daemons can never both apply one edge and no change goes unannounced.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import namedtuple
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Engine,
    Row,
    and_,
    bindparam,
    create_engine,
    event,
    exc,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.selectable import TextualSelect

from jobqueue.core.costs import CostEstimate
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
from jobqueue.store.batches import (
    BatchChange,
    Lease,
    held,
    insert_queued_batches,
    new_lease_token,
    queued_estimate,
)
from jobqueue.store.batches import next_batch_number as _next_batch_number
from jobqueue.store.batches import release as _release
from jobqueue.store.costs import prices_of
from jobqueue.store.driver import driver_of
from jobqueue.store.tables import (
    batches_table,
    events_table,
    jobs_table,
    outcomes_table,
    requests_table,
)

log = get_logger("jobqueue.store")

SQLITE_BUSY_TIMEOUT_MS = 60_000
# Connections kept open per SQLite store: one per thread that writes or reads at once (a
# daemon runs its duties, the hook dispatcher and the API's threads); more are opened when
# needed and closed when given back. Keeping them open spares each transaction an open and a
# close, and the checkpoint SQLite runs when the last connection of a WAL database closes
# (about three fsyncs): WAL is checkpointed on SQLite's own schedule (`wal_autocheckpoint`,
# every 1,000 pages), and once more when the store closes.
SQLITE_POOL_SIZE = 10
# Page cache of a pooled SQLite connection, in KiB as the pragma takes it (SQLite's default);
# a bulk write (an intake, a collection) raises it for its own transaction: a million-row index
# otherwise spills the same pages to the WAL again and again. Kept at 16 MB in every pooled
# connection, the caches alone held about 40 MB of a daemon's peak (benchmarks/endtoend.py).
SQLITE_CACHE_KIB = -2000
SQLITE_BULK_CACHE_KIB = -16384
# A PostgreSQL connection idle in the pool longer than this is pinged before it is used (the
# server may have restarted or dropped it); one just given back is used as it is, sparing a
# round trip to every transaction.
PG_PING_AFTER_IDLE = 2.0


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
        cur.execute(f"PRAGMA cache_size = {SQLITE_CACHE_KIB}")
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
                # Kept and reused (see SQLITE_POOL_SIZE); a thread has a connection to itself
                # while it holds it, and never waits for one (overflow has no limit).
                poolclass=QueuePool,
                pool_size=SQLITE_POOL_SIZE,
                max_overflow=-1,
                pool_use_lifo=True,
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            )
            _configure_sqlite(self.engine)
            self._write_lock: AbstractContextManager[Any] = threading.RLock()
        elif self.dialect == "postgresql":
            # Last in, first out: the connections in use stay few and warm, and the others
            # sit idle (and are pinged before use, see `_ping_when_idle`).
            self.engine = create_engine(url, echo=echo, pool_size=10, pool_use_lifo=True)
            _ping_when_idle(self.engine, PG_PING_AFTER_IDLE)
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
        """Close every connection of the store. On SQLite, the last one to close checkpoints
        the WAL into the database file and removes it (unless another process has it open)."""
        self.engine.dispose()
        coordination.dispose(self)

    # -- transactions -----------------------------------------------------------------------

    @contextmanager
    def write(self, *, bulk: bool = False) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on any exception. `bulk`: it
        writes index rows by the hundred thousand (SQLite gives it a bigger page cache, freed
        once it ends).

        On SQLite the threads of one process queue on a lock for the write lock: they are woken
        the moment it is free, where SQLite's busy handler would poll with sleeps of up to
        100 ms. Other processes still wait in the busy handler.
        """
        with self.writer_connection() as conn:
            # On the driver's connection: through SQLAlchemy the pragma would begin a transaction.
            sqlite = driver_of(conn) if bulk and self.dialect == "sqlite" else None
            if sqlite is not None:
                sqlite.execute(f"PRAGMA cache_size = {SQLITE_BULK_CACHE_KIB}")
            try:
                with conn.begin():
                    coordination.clear_wakes(conn)
                    yield conn
                    # The notification of the duties it gave work to goes out with the commit.
                    coordination.send_wakes(conn)
            finally:
                if sqlite is not None:  # back to the pool with the small cache: pages freed
                    with suppress(sqlite3.Error):
                        sqlite.execute(f"PRAGMA cache_size = {SQLITE_CACHE_KIB}")

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
        if lease is not None and lease.batch_id != batch_id:
            raise ValueError(f"the lease is on batch {lease.batch_id}, not {batch_id}")
        vals = _transition_values(dest, values, at, now)
        row = _cas_batch(conn, batch_id, source, vals, lease)
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

    def transition_batches(
        self, conn: Connection, changes: Sequence[BatchChange], *, now: float | None = None
    ) -> list[Row | None]:
        """Apply many batch transitions in the caller's transaction: each a compare-and-set
        (`transition_batch`'s, lease fence included), each with its event, written with as few
        statements as the database allows. The new row of each change, or None for one whose
        batch was no longer in its `source` (or under its lease): that batch is not changed
        and gets no event. The events are written in the order of `changes`.

        An illegal edge (or a lease on another batch) raises before anything is written.
        The changes that write the same columns are applied with one `UPDATE … FROM` a JSON
        array (`json_array_elements` on PostgreSQL, `json_each` on SQLite) `… RETURNING`, and
        the events of all of them with one INSERT (`INSERT … SELECT` from a JSON array on
        PostgreSQL, an `executemany` on SQLite).
        """
        now = time.time() if now is None else now
        prepared: list[tuple[BatchChange, dict[str, Any]]] = []
        for change in changes:
            _check(BATCH_MACHINE, "batch", change.batch_id, change.source, change.dest)
            if change.lease is not None and change.lease.batch_id != change.batch_id:
                raise ValueError(
                    f"the lease is on batch {change.lease.batch_id}, not {change.batch_id}"
                )
            vals = _transition_values(change.dest, change.values, change.at, now)
            prepared.append((change, vals))
        ids = [change.batch_id for change in changes]
        if len(set(ids)) == len(ids) and len(ids) > 1:
            rows = _cas_batches(conn, prepared)
        else:  # one batch changed twice: each change sees the one before it
            rows = [_cas_batch(conn, c.batch_id, c.source, vals, c.lease) for c, vals in prepared]
        events.add_events(
            conn,
            [
                {
                    "type": f"batch.{change.dest}",
                    "job_id": row.job_id,
                    "batch_id": change.batch_id,
                    "from_status": change.source,
                    "to_status": change.dest,
                    "data": {**batch_event_data(row), **(change.data or {})},
                    "created_at": now,
                }
                for change, row in zip(changes, rows, strict=True)
                if row is not None
            ],
        )
        return rows

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
        self,
        conn: Connection,
        job: Mapping[str, Any],
        batches: Iterable[Mapping[str, Any]],
        *,
        sampled: Sequence[bool] = (),
    ) -> None:
        """Insert a job and its queued batches, with `job.queued` and `batch.queued` events.
        `sampled[i]`: the i-th batch's estimate was made from a sample of its requests (the
        events say so, `estimate_sampled`; the job's when any batch's was)."""
        conn.execute(insert(jobs_table).values(**job))
        batch_rows = list(batches)
        now = job["created_at"]
        # The job's event first (hooks get it first), with its batches' estimates summed.
        prices = prices_of(self)
        estimate = sum((queued_estimate(prices, row) for row in batch_rows), CostEstimate())
        budget = {"max_cost": job["max_cost"]} if job.get("max_cost") is not None else {}
        self.add_event(
            conn,
            "job.queued",
            job_id=job["id"],
            to_status=JobStatus.QUEUED,
            data={
                "request_counts": _counts(job["request_count"], 0, 0),
                "batches": len(batch_rows),
                **estimate.to_data(),
                "estimate_sampled": any(sampled),
                **budget,
            },
            now=now,
        )
        insert_queued_batches(
            conn, batch_rows, now=now, prices=prices,
            data=[{"estimate_sampled": flag} for flag in sampled] if sampled else None,
        )  # fmt: skip

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
        return conn.execute(_GET_BATCH, {"w_id": batch_id}).first()

    def get_batches(self, conn: Connection, batch_ids: Iterable[str]) -> dict[str, Row]:
        """The batches of `batch_ids` that exist, by id (one query)."""
        ids = list(batch_ids)
        if not ids:
            return {}
        return {row.id: row for row in conn.execute(_GET_BATCHES, {"w_ids": ids})}

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


def _ping_when_idle(engine: Engine, idle: float) -> None:
    """Ping a pooled connection before use only when it sat idle in the pool over `idle`
    seconds: a dead one is then replaced, as `pool_pre_ping` would, without a round trip on
    every checkout. (One that died within `idle` fails its statement; the pool is then
    refilled, as it is for any disconnect.)"""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["jobqueue_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("jobqueue_idle_since")
        if since is None or time.monotonic() - since < idle:
            return
        try:
            cur = dbapi_conn.cursor()
            try:
                cur.execute("SELECT 1")
            finally:
                cur.close()
            dbapi_conn.rollback()
        except Exception as err:  # the pool retries with a fresh connection
            raise exc.DisconnectionError(str(err)) from err


# -- compare-and-set statements, built once ---------------------------------------------------
#
# The SET clause comes from the names of the values written: one statement's text per set of
# names (and per dialect, fenced or not), built once, serves every transition.
_B = batches_table
_B_COLUMNS = frozenset(c.name for c in _B.c)
_GET_BATCH = select(_B).where(_B.c.id == bindparam("w_id"))
_GET_BATCHES = select(_B).where(_B.c.id.in_(bindparam("w_ids", expanding=True)))


def _transition_values(
    dest: str, values: Mapping[str, Any] | None, at: float | None, now: float
) -> dict[str, Any]:
    """The columns a transition to `dest` writes: status, updated_at, the state's time column
    (`at`, else now) unless given, and `values`."""
    vals: dict[str, Any] = {"status": dest, "updated_at": now, **(values or {})}
    column = BATCH_TIME_COLUMN.get(dest)  # type: ignore[call-overload]
    if column and vals.get(column) is None:
        vals[column] = at if at is not None else now
    unknown = vals.keys() - _B_COLUMNS
    if unknown:  # a name that is no column would otherwise be an unused parameter
        raise exc.CompileError(f"Unconsumed column names: {', '.join(sorted(unknown))}")
    return vals


def _cas_batch(
    conn: Connection, batch_id: str, source: str, vals: dict[str, Any], lease: Lease | None
) -> Row | None:
    """One compare-and-set UPDATE … RETURNING: the new row, or None when it did not apply."""
    if any(isinstance(v, ClauseElement) for v in vals.values()):  # an expression: built anew
        fence = held(lease) if lease is not None else []
        return conn.execute(
            update(_B)
            .where(_B.c.id == batch_id, _B.c.status == source, *fence)
            .values(**vals)
            .returning(*_B.c)
        ).first()
    return _driver_cas_batch(conn, batch_id, source, vals, lease)


# One batch at a time, on the driver's cursor: SQLAlchemy's execution and result handling of
# the 52 returned columns cost more than the UPDATE itself (on SQLite about 0.1 ms a transition;
# benchmarks/store_transitions.py). The row comes back as a `BatchRow`: the table's columns by
# name and in order, as a SQLAlchemy row has them, JSON and booleans decoded alike (psycopg
# decodes them itself; on SQLite `_batch_row` does).
BatchRow = namedtuple("BatchRow", [c.name for c in _B.c])  # type: ignore[misc]
_JSON_COLUMNS = frozenset(c.name for c in _B.c if isinstance(c.type, JSON))
_JSON_AT = tuple(i for i, c in enumerate(_B.c) if isinstance(c.type, JSON))
_BOOLEAN_AT = tuple(i for i, c in enumerate(_B.c) if isinstance(c.type, Boolean))
_RETURNING = ", ".join(f'"{c.name}"' for c in _B.c)
_DRIVER_CAS: dict[tuple[str, tuple[str, ...], bool], str] = {}


def _driver_cas_sql(dialect: str, names: tuple[str, ...], fenced: bool) -> str:
    p = "%s" if dialect == "postgresql" else "?"
    json_p = f"CAST({p} AS json)" if dialect == "postgresql" else p
    sets = ", ".join(f'"{n}" = {json_p if n in _JSON_COLUMNS else p}' for n in names)
    fence = f' AND "lease_owner" = {p} AND "lease_token" = {p}' if fenced else ""
    return (
        f'UPDATE batches SET {sets} WHERE "id" = {p} AND "status" = {p}{fence} '
        f"RETURNING {_RETURNING}"
    )


def _driver_cas_batch(
    conn: Connection, batch_id: str, source: str, vals: dict[str, Any], lease: Lease | None
) -> Row | None:
    dialect = conn.dialect.name
    key = (dialect, tuple(vals), lease is not None)
    sql = _DRIVER_CAS.get(key)
    if sql is None:
        sql = _DRIVER_CAS[key] = _driver_cas_sql(*key)
    params = [
        json.dumps(value) if name in _JSON_COLUMNS and value is not None else value
        for name, value in vals.items()
    ]
    params += (batch_id, source) if lease is None else (batch_id, source, lease.owner, lease.token)
    found = driver_of(conn).execute(sql, params).fetchall()  # all: the statement is done with
    if not found:
        return None
    return _batch_row(found[0]) if dialect == "sqlite" else cast(Row, BatchRow._make(found[0]))


def _batch_row(values: Sequence[Any]) -> Row:
    """A `BatchRow` of a batches row as the SQLite driver returns it."""
    decoded = list(values)
    for i in _JSON_AT:
        if decoded[i] is not None:
            decoded[i] = json.loads(decoded[i])
    for i in _BOOLEAN_AT:
        if decoded[i] is not None:
            decoded[i] = bool(decoded[i])
    return cast(Row, BatchRow._make(decoded))


_PG_COLUMN_TYPES: dict[str, str] = {}


def _pg_type(conn: Connection, name: str) -> str:
    found = _PG_COLUMN_TYPES.get(name)
    if found is None:
        found = _B.c[name].type.compile(dialect=conn.dialect)
        _PG_COLUMN_TYPES[name] = found
    return found


def _cas_batches(
    conn: Connection, prepared: Sequence[tuple[BatchChange, dict[str, Any]]]
) -> list[Row | None]:
    """The compare-and-sets of many distinct batches: one `UPDATE … FROM` a JSON array
    `… RETURNING` per set of columns written (and fenced or not). The batches come as one JSON
    text (an array a batch: its id, expected status, lease, then its values), parsed by the
    database; a batch whose row does not match its element is left as it is. The statement's
    text depends on the columns alone, so it is built (and prepared) once."""
    groups: dict[tuple[tuple[str, ...], bool], list[int]] = {}
    for i, (change, vals) in enumerate(prepared):
        if any(isinstance(v, ClauseElement) for v in vals.values()):
            groups.setdefault(((), False), []).append(i)  # built one by one below
            continue
        groups.setdefault((tuple(sorted(vals)), change.lease is not None), []).append(i)
    found: dict[str, Row] = {}
    for (columns, fenced), members in groups.items():
        if not columns:
            for i in members:
                change, vals = prepared[i]
                row = _cas_batch(conn, change.batch_id, change.source, vals, change.lease)
                if row is not None:
                    found[change.batch_id] = row
            continue
        elements = []
        for i in members:
            change, vals = prepared[i]
            given: list[Any] = [change.batch_id, change.source]
            if change.lease is not None:
                given += [change.lease.owner, change.lease.token]
            elements.append(given + [vals[column] for column in columns])
        statement = _cas_many_statement(conn, columns, fenced)
        for row in conn.execute(statement, {"w_rows": _json_text(elements)}):
            found[row.id] = row
    return [found.get(change.batch_id) for change, _vals in prepared]


_CAS_MANY: dict[tuple[str, tuple[str, ...], bool], TextualSelect] = {}


def _cas_many_statement(conn: Connection, columns: tuple[str, ...], fenced: bool) -> TextualSelect:
    """`UPDATE batches … FROM` the elements of a JSON array: element k of each is cast to its
    column's type (a JSON column takes the JSON value itself). Its rows typed as the table's."""
    dialect = conn.dialect.name
    statement = _CAS_MANY.get((dialect, columns, fenced))
    if statement is None:
        pg = dialect == "postgresql"
        x = "v.x" if pg else "v.value"
        first = 4 if fenced else 2
        sets = []
        for k, c in enumerate(columns):
            if isinstance(_B.c[c].type, JSON):
                sets.append(f"{c} = {x} -> {first + k}")
            elif pg:
                sets.append(f"{c} = CAST({x} ->> {first + k} AS {_pg_type(conn, c)})")
            else:  # SQLite: the JSON value's own type, and the column's affinity
                sets.append(f"{c} = {x} ->> {first + k}")
        fence = f" AND b.lease_owner = {x} ->> 2 AND b.lease_token = {x} ->> 3" if fenced else ""
        if pg:
            source = "json_array_elements(CAST(:w_rows AS json)) AS v(x)"
        else:
            source = "json_each(:w_rows) AS v"
        # Unqualified: SQLite's RETURNING names the updated table's columns only.
        returning = ", ".join(c.name for c in _B.c)
        statement = text(
            f"UPDATE batches AS b SET {', '.join(sets)} FROM {source} "
            f"WHERE b.id = {x} ->> 0 AND b.status = {x} ->> 1{fence} RETURNING {returning}"
        ).columns(*_B.c)
        _CAS_MANY[(dialect, columns, fenced)] = statement
    return statement


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # what orjson does not know, json may (it raises the same otherwise)
        return json.dumps(value)


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
