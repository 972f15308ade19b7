"""Transitions benchmark: the store's compare-and-set transitions beside the bare driver's.

    python benchmarks/store_transitions.py [--batches N (default 10,000)]
        [--postgres-url URL | --no-postgres] [--dir D]

For each database (a fresh SQLite file; a PostgreSQL schema of its own, created and dropped),
N queued batches of one job are moved `queued -> submitting` (with a lease, as a claim writes
it) through `Store.transition_batch`, one a transaction and then 100 a transaction; then the
same N batches, put back to `queued`, are moved by the raw driver (sqlite3 / psycopg, one
connection kept open, the same durability: WAL and `synchronous = FULL` on SQLite, the server's
defaults on PostgreSQL): a bare compare-and-set `UPDATE … WHERE id = ? AND status = ?` plus an
event `INSERT`, the floor. The ratio is jobqueue's rate over the floor's, in the same run.

Then a reconcile cycle: N open batches (`validating`, with remote ids) on an `InMemoryRemote`
that holds them all `in_progress`; `reconcile_once` walks the list pages and applies the N
observations (N transitions with their events). It prints the whole cycle and the part spent
applying them (`observe_many`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GROUP = 100


# -- databases ------------------------------------------------------------------------------


@contextmanager
def sqlite_database(work: Path) -> Iterator[str]:
    yield f"sqlite:///{work / 'transitions.db'}"


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"bench_transitions_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def add_job(store: Any, count: int, status: str = "queued", **extra: Any) -> tuple[str, list[str]]:
    """One job and `count` batches in `status` (bulk insert, no events)."""
    from benchmarks.reconcile import insert_running_job
    from jobqueue.core.ids import new_id

    now = time.time()
    job_id = new_id("job")
    rows = [
        {
            "id": new_id("batch"),
            "job_id": job_id,
            "number": i + 1,
            "status": status,
            "shard_index": i,
            "attempt": 1,
            "model": "gpt-4o-mini",
            "input_path": f"/nonexistent/shard-{i}.jsonl",
            "request_count": 1000,
            "bytes": 100_000,
            "created_at": now,
            "updated_at": now,
            **{k: (v(i) if callable(v) else v) for k, v in extra.items()},
        }
        for i in range(count)
    ]
    insert_running_job(store, job_id, rows, requests=1000 * count, size=100_000 * count, now=now)
    return job_id, [r["id"] for r in rows]


def requeue_all(store: Any, job_id: str) -> None:
    from sqlalchemy import update

    from jobqueue.store.tables import batches_table as b

    with store.write() as conn:
        conn.execute(
            update(b)
            .where(b.c.job_id == job_id)
            .values(status="queued", lease_owner=None, lease_until=None, lease_token=None,
                    submitting_at=None)
        )  # fmt: skip


# -- jobqueue ---------------------------------------------------------------------------------


OWNER = "bench:1:abcdef"


def claim_values(now: float) -> dict[str, Any]:
    """What a claim writes with `queued -> submitting`: the lease and the attempt."""
    return {
        "lease_owner": OWNER,
        "lease_until": now + 300,
        "lease_token": os.urandom(8).hex(),
        "submit_attempts": 1,
        "not_before": None,
    }


def jobqueue_rate(store: Any, ids: list[str], per_txn: int) -> float:
    """Transitions a second through `Store.transition_batch`, `per_txn` a transaction."""
    start = time.perf_counter()
    for first in range(0, len(ids), per_txn):
        with store.write() as conn:
            for batch_id in ids[first : first + per_txn]:
                now = time.time()
                row = store.transition_batch(
                    conn,
                    batch_id,
                    "queued",
                    "submitting",
                    values=claim_values(now),
                    now=now,
                )
                assert row is not None
    return len(ids) / (time.perf_counter() - start)


def jobqueue_grouped_rate(store: Any, ids: list[str], per_txn: int) -> float | None:
    """The same through `Store.transition_batches` (one call a group), when the store has it."""
    if not hasattr(store, "transition_batches"):
        return None
    from jobqueue.store import BatchChange

    start = time.perf_counter()
    for first in range(0, len(ids), per_txn):
        now = time.time()
        changes = [
            BatchChange(
                batch_id,
                "queued",
                "submitting",
                values=claim_values(now),
            )
            for batch_id in ids[first : first + per_txn]
        ]
        with store.write() as conn:
            rows = store.transition_batches(conn, changes, now=now)
        assert all(r is not None for r in rows)
    return len(ids) / (time.perf_counter() - start)


# -- the bare driver --------------------------------------------------------------------------

_UPDATE = (
    "UPDATE batches SET status = {p}, updated_at = {p}, submitting_at = {p}, lease_owner = {p}, "
    "lease_until = {p}, lease_token = {p}, submit_attempts = {p}, not_before = NULL "
    "WHERE id = {p} AND status = {p} RETURNING job_id"
)
_INSERT = (
    "INSERT INTO events (id, type, created_at, job_id, batch_id, from_status, to_status, data) "
    "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})"
)


def bare_loop(
    conn: Any, begin: Callable[[], None], commit: Callable[[], None], p: str,
    ids: list[str], per_txn: int,
) -> float:  # fmt: skip
    update_sql, insert_sql = _UPDATE.format(p=p), _INSERT.format(p=p)
    cur = conn.cursor()
    owner = OWNER
    start = time.perf_counter()
    for first in range(0, len(ids), per_txn):
        begin()
        for batch_id in ids[first : first + per_txn]:
            now = time.time()
            cur.execute(
                update_sql,
                ("submitting", now, now, owner, now + 300, os.urandom(8).hex(), 1,
                 batch_id, "queued"),
            )  # fmt: skip
            found = cur.fetchone()
            assert found is not None
            data = orjson.dumps({"attempt": 1, "shard_index": 0, "model": "gpt-4o-mini"})
            cur.execute(
                insert_sql,
                ("evt_" + os.urandom(12).hex(), "batch.submitting", now, found[0], batch_id,
                 "queued", "submitting", data.decode()),
            )  # fmt: skip
        commit()
    cur.close()
    return len(ids) / (time.perf_counter() - start)


def bare_rate(url: str, ids: list[str], per_txn: int) -> float:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        import sqlite3

        conn = sqlite3.connect(parsed.database or "", isolation_level=None)
        for pragma in ("busy_timeout = 60000", "journal_mode = WAL", "synchronous = FULL",
                       "foreign_keys = ON"):  # fmt: skip
            conn.execute(f"PRAGMA {pragma}")
        try:
            return bare_loop(
                conn, lambda: conn.execute("BEGIN IMMEDIATE"), lambda: conn.execute("COMMIT"),
                "?", ids, per_txn,
            )  # fmt: skip
        finally:
            conn.close()
    import psycopg

    options = parsed.query.get("options")
    pg = psycopg.connect(
        host=parsed.host or "127.0.0.1", port=parsed.port or 5432, user=parsed.username,
        password=parsed.password, dbname=parsed.database,
        **({"options": options} if isinstance(options, str) else {}),
    )  # fmt: skip
    try:
        return bare_loop(pg, lambda: None, pg.commit, "%s", ids, per_txn)
    finally:
        pg.close()


# -- reconcile ----------------------------------------------------------------------------------


def reconcile_cycle(store: Any, work: Path, count: int) -> dict[str, float]:
    """Seconds of one `reconcile_once` that applies `count` observations (validating ->
    in_progress), and of the part spent in `observe_many`."""
    import jobqueue.duties.reconcile as reconcile
    from jobqueue.duties.context import DutyContext
    from jobqueue.settings import load_settings
    from jobqueue.testing import InMemoryRemote

    remote = InMemoryRemote()
    source = work / "one.jsonl"
    source.write_bytes(
        orjson.dumps({"custom_id": "r-0", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "gpt-4o-mini", "messages": []}})
        + b"\n"
    )  # fmt: skip
    file = remote.upload_file(source, "one.jsonl")
    remote_ids = []
    for _ in range(count):
        made = remote.create_batch(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={}, output_expires_after=None,
        )  # fmt: skip
        remote.advance(made.id, "in_progress")
        remote_ids.append(made.id)
    remote.clear_calls()
    now = time.time()
    add_job(
        store, count, status="validating", remote_id=lambda i: remote_ids[i],
        input_file_id=file.id, submitting_at=now - 60, validating_at=now - 60,
        expires_at=now + 86_400,
    )  # fmt: skip
    settings = load_settings(
        database_url=store.url, data_dir=str(work / "data"), api_key="bench", log_level="warning"
    )
    ctx = DutyContext(store=store, provider=remote, settings=settings)
    applying = [0.0]
    original = reconcile.observe_many

    def timed(*args: Any, **kwargs: Any) -> int:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            applying[0] += time.perf_counter() - start

    reconcile.observe_many = timed  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        moved = reconcile.reconcile_once(ctx)
        seconds = time.perf_counter() - start
    finally:
        reconcile.observe_many = original  # type: ignore[assignment]
    assert moved == count, (moved, count)
    return {"cycle": seconds, "applying": applying[0]}


# -- the run --------------------------------------------------------------------------------------


def measure(label: str, url: str, work: Path, count: int, rounds: int) -> dict[str, Any]:
    """The three loops (jobqueue, grouped, bare driver) interleaved in `rounds` rounds, each on
    batches of its own, so that a busy moment of a shared machine falls on all of them."""
    from jobqueue.store import Store

    store = Store(url)
    try:
        jobs = {name: add_job(store, count) for name in ("jobqueue", "grouped", "bare")}
        out: dict[str, Any] = {"db": label}
        size = -(-count // rounds)
        for per_txn in (1, GROUP):
            seconds = dict.fromkeys(jobs, 0.0)
            for job_id, _ in jobs.values():
                requeue_all(store, job_id)
            for first in range(0, count, size):
                for name, (_job, ids) in jobs.items():
                    part = ids[first : first + size]
                    if name == "jobqueue":
                        rate = jobqueue_rate(store, part, per_txn)
                    elif name == "grouped":
                        found = jobqueue_grouped_rate(store, part, per_txn) if per_txn > 1 else None
                        if found is None:
                            seconds[name] = float("nan")
                            continue
                        rate = found
                    else:
                        rate = bare_rate(url, part, per_txn)
                    seconds[name] += len(part) / rate
            out[per_txn] = {
                name: (None if secs != secs else count / secs) for name, secs in seconds.items()
            }
        out["reconcile"] = reconcile_cycle(store, work, count)
        return out
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=10_000)
    ap.add_argument("--postgres-url", default=os.environ.get("JOBQUEUE_TEST_POSTGRES_URL")
                    or DEFAULT_PG_URL)  # fmt: skip
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    ap.add_argument("--rounds", type=int, default=5, help="the loops take turns this many times")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument(
        "--log-level", default="warning", help="info: a line per batch that reconcile moves"
    )
    args = ap.parse_args(argv)

    from jobqueue.logs import configure_logging

    configure_logging(args.log_level, "json")
    work = args.dir or Path(tempfile.mkdtemp(prefix="jobqueue-transitions-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        with sqlite_database(work) as url:
            results.append(measure("SQLite", url, work, args.batches, args.rounds))
        if not args.no_postgres:
            with postgres_schema(args.postgres_url) as url:
                results.append(measure("PostgreSQL", url, work, args.batches, args.rounds))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.batches:,} batches, queued -> submitting through Store.transition_batch\n")
    print("| | jobqueue | bare driver | ratio | grouped (transition_batches) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        for per_txn, what in ((1, "one a transaction"), (GROUP, f"{GROUP} a transaction")):
            m = r[per_txn]
            grouped = "-"
            if m["grouped"]:
                grouped = f"{m['grouped']:,.0f}/s ({m['grouped'] / m['bare']:.2f})"
            print(
                f"| {r['db']}, {what} | {m['jobqueue']:,.0f}/s | {m['bare']:,.0f}/s | "
                f"{m['jobqueue'] / m['bare']:.2f} | {grouped} |"
            )
    print(f"\nreconcile cycle applying {args.batches:,} observations (validating -> in_progress)\n")
    print("| | whole cycle | applying (observe_many) |")
    print("| --- | ---: | ---: |")
    for r in results:
        rc = r["reconcile"]
        print(f"| {r['db']} | {rc['cycle']:.2f} s | {rc['applying']:.2f} s |")


if __name__ == "__main__":
    main()
