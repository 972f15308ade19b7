"""Several daemons on one PostgreSQL database: one leader runs the reconcile walk and the
maintenance for all, another takes over when it goes; wake-ups travel by LISTEN/NOTIFY."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from jobqueue.api import JobQueue
from jobqueue.service.daemon import LEADER_DUTIES, Daemon
from jobqueue.service.leadership import Leadership
from jobqueue.service.wakeups import Listener
from jobqueue.store import Store, coordination
from jobqueue.testing import InMemoryRemote
from tests.daemon_helpers import wait_until
from tests.factories import chat_file

ENDPOINT = "/v1/chat/completions"
pytestmark = pytest.mark.postgres


@pytest.fixture
def queue(postgres_url: str, tmp_path: Path) -> Iterator[JobQueue]:
    jq = JobQueue(database_url=postgres_url, data_dir=tmp_path / "data", poll_interval=0.2)
    yield jq
    jq.close()


@pytest.fixture
def fleet_of(queue: JobQueue, postgres_url: str) -> Iterator[Callable[..., list[Daemon]]]:
    """Daemons on stores of their own (as separate processes would be), one remote for all;
    keywords change their settings."""
    remote = InMemoryRemote()
    made: list[tuple[Daemon, Store]] = []

    def make(n: int, **settings: object) -> list[Daemon]:
        out = []
        chosen = queue.settings.model_copy(update=settings)
        for i in range(n):
            store = Store(postgres_url)
            daemon = Daemon(chosen, store, remote, owner=f"daemon-{len(made) + i}")
            made.append((daemon, store))
            out.append(daemon)
        return out

    yield make
    for daemon, store in made:
        daemon.stop()
        store.close()


def _leaders(daemons: list[Daemon]) -> list[Daemon]:
    return [d for d in daemons if d.leading]


def test_one_daemon_leads_and_only_it_reconciles(queue: JobQueue, fleet_of, tmp_path) -> None:
    daemons = fleet_of(3)
    for daemon in daemons:
        daemon.start()
    (leader,) = _leaders(daemons)
    job = queue.submit(chat_file(tmp_path / "in.jsonl", 30), ENDPOINT, max_batch_requests=10)
    remote: InMemoryRemote = leader.provider  # type: ignore[assignment]
    remote.wait_for_batches(3)
    wait_until(lambda: all(b.status == "validating" for b in queue.get(job.id).batches))
    wait_until(lambda: leader.duty_states()["reconcile"]["runs"] >= 3)
    for batch in remote.batches():
        remote.complete(batch.id)
    assert queue.wait(job.id, timeout=30).status == "completed"
    assert _leaders(daemons) == [leader]
    for daemon in daemons:
        states = daemon.duty_states()
        if daemon is leader:
            assert states["reconcile"]["runs"] > 0 and states["expire"]["runs"] > 0
            assert daemon.stats["reconcile_calls"] > 0
        else:
            assert all(states[name]["runs"] == 0 for name in LEADER_DUTIES)
            assert daemon.stats.get("reconcile_calls", 0) == 0
    # The submissions were shared out: they went to whichever daemon claimed first.
    assert len(list(queue.results(job.id))) == 30


def test_a_follower_takes_over_when_the_leader_stops(fleet_of) -> None:
    daemons = fleet_of(2)
    for daemon in daemons:
        daemon.start()
    (leader,) = _leaders(daemons)
    (follower,) = [d for d in daemons if d is not leader]
    runs = follower.duty_states()["reconcile"]["runs"]
    assert runs == 0
    leader.stop()
    wait_until(lambda: follower.leading, timeout=5)
    wait_until(lambda: follower.duty_states()["reconcile"]["runs"] > 0, timeout=5)


def test_a_leader_whose_session_ends_stops_leading(queue: JobQueue, fleet_of) -> None:
    """The server ends the leader's session (as it does when the leader dies or hangs): the
    lock is free at once, another daemon takes it, and the old leader knows it no longer
    leads (or took it back first: one leader either way)."""
    daemons = fleet_of(2)
    for daemon in daemons:
        daemon.start()
    assert len(_leaders(daemons)) == 1
    with queue.store.read() as conn:
        pid = coordination.leader_pid(conn)
    assert pid is not None
    admin = create_engine(queue.store.url)
    with admin.begin() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    admin.dispose()

    def new_session_leads() -> bool:
        with queue.store.read() as conn:
            now = coordination.leader_pid(conn)
        return now is not None and now != pid and len(_leaders(daemons)) == 1

    wait_until(new_session_leads, timeout=5)
    wait_until(lambda: sum(d.leading for d in daemons) == 1, timeout=5)


def test_leadership_is_per_schema(postgres_url: str, tmp_path: Path) -> None:
    """Two installations in two schemas of one database each have their leader."""
    from sqlalchemy.engine import make_url

    admin = create_engine(postgres_url)
    other = "t_other_" + tmp_path.name[-8:].replace("-", "_").lower()
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{other}"'))
    other_url = (
        make_url(postgres_url)
        .update_query_dict({"options": f"-csearch_path={other}"})
        .render_as_string(hide_password=False)
    )
    stores = [Store(postgres_url), Store(other_url)]
    leaderships = [Leadership(s) for s in stores]
    try:
        assert [lead.check() for lead in leaderships] == [True, True]
        rival = Leadership(stores[0])
        assert rival.check() is False
        rival.stop()
    finally:
        for lead in leaderships:
            lead.stop()
        for store in stores:
            store.close()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{other}" CASCADE'))
        admin.dispose()


def test_a_committed_write_wakes_the_listeners_and_a_rolled_back_one_does_not(
    queue: JobQueue, tmp_path: Path
) -> None:
    heard: list[list[str]] = []
    got = threading.Event()

    def on_wake(duties: list[str]) -> None:
        heard.append(sorted(duties))
        got.set()

    listener = Listener(queue.store, on_wake, lambda: None)
    listener.start()
    try:
        assert listener.wait_listening(5)
        with pytest.raises(RuntimeError), queue.store.write() as conn:
            coordination.wake(conn, "submit")
            raise RuntimeError("rolled back")
        assert not got.wait(1.0)
        queue.submit(chat_file(tmp_path / "in.jsonl", 3), ENDPOINT)
        assert got.wait(5)
        assert heard == [["hooks", "submit"]]
    finally:
        listener.stop()


def test_a_submit_from_the_cli_wakes_a_running_daemon_at_once(
    queue: JobQueue, fleet_of, tmp_path: Path
) -> None:
    """A daemon that polls hourly (its submit tick every 2 s) still picks up a job committed
    by another process within a second: the commit's notification wakes its submit duty."""
    from jobqueue.cli.app import main

    (daemon,) = fleet_of(1, poll_interval=3600.0)
    daemon.start()
    args = ["--database-url", queue.store.url, "--data-dir", str(queue.data_dir)]
    for i in range(4):
        time.sleep(0.3 * i)  # at different points of the daemon's 2 s submit tick
        source = chat_file(tmp_path / f"in-{i}.jsonl", 3)  # the same requests each time
        submit = [*args, "submit", str(source), "--endpoint", ENDPOINT, "--allow-duplicate"]
        assert main([*submit, "--json"]) == 0
        job = queue.jobs(limit=1)[0]
        wait_until(lambda job=job: queue.get(job.id).batches[0].status != "queued", timeout=5)
        events = {e.type: e.created_at for e in queue.events(job.id)}
        waited = (events["batch.submitting"] - events["job.queued"]).total_seconds()
        assert waited < 1.0, f"picked up {waited:.2f}s after the commit"
    assert daemon.stats["notified_wakes"] >= 4
