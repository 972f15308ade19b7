"""Builders and readers shared by the store contract suite.

Rows are written the way intake writes them (`Store.insert_job`, then the request index), and
read back through the store's own getters, each called from one function here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from sqlalchemy import Row, and_, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.sql.schema import Table

from jobqueue.core.ids import new_id
from jobqueue.store import Store
from jobqueue.store.tables import batches_table, outcomes_table, requests_table

# A fixed clock, far from the real one: operations that take `now` get it, so a column stamped
# from the local clock instead of the time handed in shows up at once.
NOW = 1_700_000_000.0
LEASE = 300.0


def job_values(job_id: str, *, requests: int, now: float = NOW, **values: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "status": "queued",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "user_metadata": {},
        "max_attempts": 3,
        "source": "test.jsonl",
        "input_dir": "/nonexistent",
        "max_batch_requests": 50_000,
        "max_batch_bytes": 200 * 1024 * 1024,
        "request_count": requests,
        "bytes": 100 * requests,
        "created_at": now,
        "updated_at": now,
        **values,
    }


def batch_values(
    job_id: str, number: int, *, requests: int, now: float = NOW, **values: Any
) -> dict[str, Any]:
    return {
        "id": new_id("batch"),
        "job_id": job_id,
        "number": number,
        "status": "queued",
        "shard_index": number - 1,
        "attempt": 1,
        "model": "gpt-4o-mini",
        "input_path": f"/nonexistent/shard-{number}.jsonl",
        "request_count": requests,
        "bytes": 100 * requests,
        "created_at": now,
        "updated_at": now,
        **values,
    }


def add_job(
    store: Store, *batches: Mapping[str, Any], now: float = NOW, **job: Any
) -> tuple[str, list[str]]:
    """A job with one batch per spec (column overrides, and `requests`: how many request index
    rows it holds, 1 unless given), its requests at consecutive positions in batch order with
    custom ids `req-<position>`. The job is `running` once a batch is past `queued`, unless the
    spec says otherwise. The requests of a batch given `collected_at` have their outcome rows,
    pending, as collection leaves them (`set_requests` gives them an outcome). Returns (job id,
    batch ids)."""
    job_id = new_id("job")
    specs = [dict(spec) for spec in (batches or ({},))]
    counts = [int(spec.pop("requests", 1)) for spec in specs]
    rows = [
        batch_values(job_id, i + 1, requests=n, now=now, **spec)
        for i, (spec, n) in enumerate(zip(specs, counts, strict=True))
    ]
    # One executemany: every row needs the same keys; a column a spec leaves out gets its default.
    keys = {k for row in rows for k in row}
    for row in rows:
        for key in keys - row.keys():
            default = batches_table.c[key].default
            row[key] = default.arg if default is not None and default.is_scalar else None
    job.setdefault("status", "queued" if all(r["status"] == "queued" for r in rows) else "running")
    values = job_values(job_id, requests=sum(counts), now=now, **job)
    with store.write() as conn:
        values["number"] = store.next_job_number(conn)
        store.insert_job(conn, values, rows)
        position = 0
        for row, n in zip(rows, counts, strict=True):
            ids = [f"req-{p}" for p in range(position, position + n)]
            store.insert_requests_json(
                conn, values["number"], row["number"], orjson.dumps(ids).decode(), position
            )
            if row.get("collected_at") is not None:
                conn.execute(
                    insert(outcomes_table),
                    [
                        {"job_number": values["number"], "position": p}
                        for p in range(position, position + n)
                    ],
                )
            position += n
    return job_id, [r["id"] for r in rows]


# -- readers ----------------------------------------------------------------------------------


def get_batch(store: Store, batch_id: str) -> Row:
    with store.read() as conn:
        row = store.get_batch(conn, batch_id)
    assert row is not None, batch_id
    return row


def get_job(store: Store, job_id: str) -> Row:
    with store.read() as conn:
        row = store.get_job(conn, job_id)
    assert row is not None, job_id
    return row


def events_of(store: Store, job_id: str | None = None, *, batch_id: str | None = None) -> list[Row]:
    """Events in outbox order, of one job (or all), of one batch if given."""
    with store.read() as conn:
        rows = store.events(conn, job_id)
    return [e for e in rows if batch_id is None or e.batch_id == batch_id]


def count(store: Store, table: Table, *where: Any) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


_OUTCOME_COLUMNS = (
    "outcome", "status_code", "error_code", "result_batch_number", "result_kind",
    "result_offset", "result_length", "input_tokens", "cached_input_tokens", "output_tokens",
    "reasoning_tokens",
)  # fmt: skip


def requests_of(store: Store, job_id: str) -> list[Row]:
    """The job's request index rows, by position, each with its outcome row's columns (None
    where it has none)."""
    r, o = requests_table, outcomes_table
    number = get_job(store, job_id).number
    with store.read() as conn:
        return list(
            conn.execute(
                select(r, *(o.c[c] for c in _OUTCOME_COLUMNS))
                .outerjoin(o, and_(o.c.job_number == r.c.job_number, o.c.position == r.c.position))
                .where(r.c.job_number == number)
                .order_by(r.c.position)
            ).all()
        )


# -- two connections at once -------------------------------------------------------------------


def second_store(db_url: str) -> Store:
    """Another store on the same database, as a second daemon would open it (its own engine,
    its own connections). On PostgreSQL its connections carry an application name of their own,
    so `wait_until_blocked` can tell them from every other session on the server."""
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        url = url.update_query_dict({"application_name": new_id("second")})
    return Store(url.render_as_string(hide_password=False))


def wait_until_blocked(other: Store, started: threading.Event, timeout: float = 30.0) -> None:
    """Return once a thread writing through `other`, which set `started` just before its write,
    waits on a lock held by this test.

    On PostgreSQL that is visible: a backend of `other` waits on a lock (`pg_stat_activity`).
    A SQLite writer waits on the database's write lock, which no view shows: `started` is all
    there is to wait for there.
    """
    assert started.wait(timeout), "the other writer never started"
    if other.dialect != "postgresql":
        return
    name = make_url(other.url).query["application_name"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with other.engine.connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND application_name = %s",
                (name,),
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.01)
    raise AssertionError("the other writer never waited on a lock")


class InThread:
    """Run `fn` in a thread; `started` is set just before it; `result()` joins and returns."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.started = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            self.started.set()
            try:
                self._value = fn()
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def done(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self, timeout: float = 60.0) -> Any:
        assert self.done(timeout), "the thread did not finish"
        if self._error is not None:
            raise self._error
        return self._value


def set_requests(store: Store, job_id: str, positions: list[int], **values: Any) -> None:
    """Put some of a job's requests in a state (an outcome, an attempt) for a test to start
    from: request columns on `requests`, outcome columns on their `outcomes` rows (made if
    missing)."""
    r, o = requests_table, outcomes_table
    number = get_job(store, job_id).number
    outcome = {k: v for k, v in values.items() if k in _OUTCOME_COLUMNS}
    request = {k: v for k, v in values.items() if k not in _OUTCOME_COLUMNS}
    with store.write() as conn:
        if request:
            conn.execute(
                update(r)
                .where(r.c.job_number == number, r.c.position.in_(positions))
                .values(**request)
            )
        if outcome:
            have = set(
                conn.execute(
                    select(o.c.position).where(
                        o.c.job_number == number, o.c.position.in_(positions)
                    )
                ).scalars()
            )
            for position in positions:
                if position not in have:
                    conn.execute(insert(o).values(job_number=number, position=position))
            conn.execute(
                update(o)
                .where(o.c.job_number == number, o.c.position.in_(positions))
                .values(**outcome)
            )
