"""Two processes write to one SQLite file at once (the CLI beside a daemon): no 'database is
locked', no lost write."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from sqlalchemy import func, select

from jobqueue.api import JobQueue
from jobqueue.store import Store
from jobqueue.store.tables import events_table, jobs_table
from tests.factories import chat_file, insert_job_with_batch


def _submitter(url: str, data_dir: str, source: str, n: int, start) -> None:
    start.wait()
    with JobQueue(database_url=url, data_dir=data_dir) as jq:
        for _ in range(n):
            jq.submit(source, "/v1/chat/completions", max_batch_requests=100)


def _transitioner(url: str, n: int, start) -> None:
    store = Store(url)
    start.wait()
    for _ in range(n):
        _, batch_id = insert_job_with_batch(store, "validating", requests=50)
        for source, dest in [("validating", "in_progress"), ("in_progress", "finalizing"),
                             ("finalizing", "completed")]:  # fmt: skip
            with store.write() as conn:
                assert store.transition_batch(conn, batch_id, source, dest) is not None
    store.close()


def test_two_processes_write_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    Store(url).close()  # migrate once up front
    source = chat_file(tmp_path / "in.jsonl", 1_000)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [
        ctx.Process(target=_submitter, args=(url, str(tmp_path / "data"), str(source), 8, start)),
        ctx.Process(target=_transitioner, args=(url, 40, start)),
        ctx.Process(target=_transitioner, args=(url, 40, start)),
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store = Store(url)
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(jobs_table)).scalar_one() == 8 + 80
        completed = conn.execute(
            select(func.count())
            .select_from(events_table)
            .where(events_table.c.type == "batch.completed")
        ).scalar_one()
    assert completed == 80
    store.close()
