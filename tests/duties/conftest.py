"""The duties against the in-memory remote with a frozen clock, on SQLite and PostgreSQL.

A `World` is one database and data dir (a `JobQueue`, used for intake and for reading jobs
back), one `InMemoryRemote` and one `Clock`; `world.ctx(owner)` is a daemon's `DutyContext` on
them, so two contexts with two owners are two daemons sharing the work.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Row
from sqlalchemy.engine import make_url

from jobqueue.api import JobQueue
from jobqueue.core.records import Job
from jobqueue.duties.context import DutyContext
from jobqueue.store import Store, daemons
from jobqueue.testing import Clock, InMemoryRemote
from tests.factories import chat_file

ENDPOINT = "/v1/chat/completions"
CALL_TIMEOUT = 60.0


class Crash(BaseException):
    """Stands in for a daemon killed mid-call: no `except Exception` in the duties catches it."""


@dataclass
class World:
    jq: JobQueue
    clock: Clock
    remote: InMemoryRemote
    tmp_path: Path
    db_url: str
    stores: list[Store] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return self.jq.store

    @property
    def settings(self) -> Any:
        return self.jq.settings

    def ctx(self, owner: str = "owner-1", *, own_store: bool = False) -> DutyContext:
        """A daemon's context; `own_store`: on a store (engine) of its own, as another process
        would be."""
        store = self.store
        if own_store:
            store = Store(self.db_url)
            self.stores.append(store)
        return DutyContext(
            store=store, provider=self.remote, settings=self.settings, owner=owner,
            clock=self.clock,
        )  # fmt: skip

    def register(self, owner: str) -> None:
        """Give `owner` a row in the daemons table, its heartbeat now: a daemon that registered
        (its host and pid are those its name gives, as `make_owner` makes them)."""
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        with self.store.write() as conn:
            daemons.register_daemon(
                conn, daemon_id=owner, host=host, pid=int(pid) if pid.isdigit() else 0,
                version="test", now=self.clock(),
            )  # fmt: skip

    def beat(self, owner: str) -> bool:
        """Renew `owner`'s heartbeat at the clock's time."""
        with self.store.write() as conn:
            return daemons.renew_heartbeat(conn, owner, self.clock())

    def submit(self, n: int = 3, **options: Any) -> Job:
        source = chat_file(self.tmp_path / f"in-{len(self.jq.jobs())}.jsonl", n)
        return self.jq.submit(source, ENDPOINT, **options)

    def job(self, job_id: str) -> Job:
        return self.jq.get(job_id)

    def row(self, batch_id: str) -> Row:
        with self.store.read() as conn:
            row = self.store.get_batch(conn, batch_id)
        assert row is not None
        return row

    def event_types(self, job_id: str) -> list[str]:
        return [e.type for e in self.jq.events(job_id)]

    def results(self, job_id: str) -> list[dict[str, Any]]:
        return list(self.jq.results(job_id))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database, copied in place of each test's (migrating costs ~0.3 s)."""
    path = tmp_path_factory.mktemp("template") / "jobqueue.db"
    Store(f"sqlite:///{path}").close()
    assert not path.with_name("jobqueue.db-wal").exists()
    return path


@pytest.fixture
def make_world(
    db_url: str, tmp_path: Path, sqlite_template: Path
) -> Iterator[Callable[..., World]]:
    made: list[World] = []
    database = make_url(db_url).database
    if make_url(db_url).get_backend_name() == "sqlite" and database:
        shutil.copyfile(sqlite_template, database)

    def make(**settings: Any) -> World:
        clock = Clock()
        jq = JobQueue(database_url=db_url, data_dir=tmp_path / "data", **settings)
        # Calls time out after a minute on the clock, as the HTTP client's would: the bound
        # (`max_call_seconds`) a lease must outlive when a create starts.
        remote = InMemoryRemote(clock=clock, call_timeout=CALL_TIMEOUT)
        world = World(jq, clock, remote, tmp_path, db_url)
        made.append(world)
        return world

    yield make
    for world in made:
        for store in world.stores:
            store.close()
        world.jq.close()


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()
