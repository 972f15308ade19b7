"""Daemons that know each other: a running daemon is registered and heartbeats, a clean stop
marks it stopped, and a daemon killed with SIGKILL has its hook lane taken over by another
within the heartbeat timeout, long before the lease it held runs out."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from jobqueue.api import JobQueue
from jobqueue.emulator import EmulatorConfig, serve_in_thread
from jobqueue.hooks.dispatcher import Dispatcher
from jobqueue.service.daemon import Daemon
from jobqueue.settings import ConfigError, load_settings
from jobqueue.store import Store, daemons
from jobqueue.store.tables import deliveries_table
from jobqueue.testing import InMemoryRemote
from tests.daemon_helpers import API_KEY, make_queue, wait_until
from tests.factories import chat_file
from tests.test_daemon_process import _daemon_env, _start, _terminate
from tests.test_hooks_dispatcher import Recorder, emit, sink

ENDPOINT = "/v1/chat/completions"


def test_heartbeat_interval_and_daemon_timeout_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = load_settings()
    assert (defaults.heartbeat_interval, defaults.daemon_timeout) == (5.0, 30.0)
    config = tmp_path / "jobqueue.toml"
    config.write_text('daemon_timeout = "1m"\n')
    monkeypatch.setenv("JOBQUEUE_HEARTBEAT_INTERVAL", "10s")
    settings = load_settings(config)
    assert (settings.heartbeat_interval, settings.daemon_timeout) == (10.0, 60.0)
    monkeypatch.setenv("JOBQUEUE_HEARTBEAT_INTERVAL", "1m")
    with pytest.raises(ConfigError, match=r"heartbeat_interval \(60s\) must be shorter than "
                       r"daemon_timeout \(60s\)"):  # fmt: skip
        load_settings(config)


def _rows(store: Store) -> dict[str, object]:
    with store.read() as conn:
        return {row.id: row for row in daemons.daemon_rows(conn)}


def test_a_daemon_registers_heartbeats_and_marks_itself_stopped(
    db_url: str, tmp_path: Path
) -> None:
    jq = JobQueue(database_url=db_url, data_dir=tmp_path / "data", poll_interval=0.2)
    daemon = Daemon(jq.settings, jq.store, InMemoryRemote(auto_complete=True))
    try:
        daemon.start()
        row = _rows(jq.store)[daemon.owner]
        assert (row.pid, row.stopped_at) == (int(daemon.owner.split(":")[1]), None)  # type: ignore[attr-defined]
        assert daemon.ctx.may_claim()
        first = row.heartbeat_at  # type: ignore[attr-defined]
        time.sleep(0.01)
        assert daemon.heartbeat()
        assert _rows(jq.store)[daemon.owner].heartbeat_at > first  # type: ignore[attr-defined]
        job = jq.submit(chat_file(tmp_path / "in.jsonl", 3), ENDPOINT)
        assert jq.wait(job.id, timeout=30).status == "completed"
    finally:
        daemon.stop()
    row = _rows(jq.store)[daemon.owner]
    assert row.stopped_at is not None  # type: ignore[attr-defined]
    assert not daemon.ctx.may_claim()
    with jq.store.read() as conn:
        assert not jq.store.lease_owners(conn)
    jq.close()


def test_a_dispatcher_takes_over_dead_owners_and_claims_nothing_when_told(store: Store) -> None:
    recorder = Recorder()
    now = [1_700_000_000.0]
    dead = Dispatcher(store, [sink(recorder)], "dead/hooks", clock=lambda: now[0])
    alive = {"claims": False}
    other = Dispatcher(
        store, [sink(recorder)], "other/hooks", clock=lambda: now[0],
        free_owners=lambda: {"dead/hooks"}, may_claim=lambda: alive["claims"],
    )  # fmt: skip
    try:
        dead._ensure_cursors(now[0])
        other._ensure_cursors(now[0])
        (event_id,) = emit(store, "job_1", "job.queued")
        # The dead one claimed the delivery and died before delivering it.
        dead.fan_out()
        with store.write() as conn:
            dead._claim(conn, {"py"}, now[0])
        now[0] += 1  # its lease runs for another minute
        assert other.run_once() == 0 and recorder.calls == []  # may not claim: nothing
        alive["claims"] = True
        assert other.run_once() == 1
        assert recorder.ok_ids() == [event_id]
    finally:
        dead.close()
        other.close()


def test_a_killed_daemons_hook_lane_is_taken_over_within_the_heartbeat_timeout(
    postgres_url: str, tmp_path: Path
) -> None:
    """Daemon one's command hook is held delivering `job.queued` when one is SIGKILLed: its
    lease on that delivery would hold the job's events back for a minute. Daemon two, started
    after, finds one dead (its process is gone; its heartbeat would go stale within the
    timeout on another host) and delivers the event again at once."""
    log, hold = tmp_path / "hook.log", tmp_path / "hold"
    hold.touch()
    script = (
        "import json,os,sys,time; e=json.load(sys.stdin); "
        f"open({str(log)!r},'a').write(json.dumps([os.getppid(), e['id'], time.time()])+'\\n'); "
        f"[time.sleep(0.05) for _ in range(2400) if os.path.exists({str(hold)!r})]"
    )
    config = tmp_path / "jobqueue.toml"
    config.write_text(
        "[[hooks]]\n"
        'name = "lane"\nevents = ["job.*"]\ntimeout = 20\n'
        f"command = {json.dumps(f'exec {sys.executable} -c {json.dumps(script)}')}\n"
    )
    with serve_in_thread(EmulatorConfig(time_scale=3600, seed=41, api_key=API_KEY)) as em:
        jq = make_queue(postgres_url, tmp_path / "data", em.base_url)
        env = _daemon_env(postgres_url, tmp_path / "data", em.base_url, JOBQUEUE_CONFIG=str(config))
        daemon_log = tmp_path / "daemon.log"
        one = _start(env, daemon_log)
        two = None
        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 3), ENDPOINT)
            (queued,) = [e for e in jq.events(job.id) if e.type == "job.queued"]
            wait_until(lambda: log.exists() and log.read_text().strip(), timeout=60)
            first_pid, first_event, _ = json.loads(log.read_text().splitlines()[0])
            assert (first_pid, first_event) == (one.pid, queued.id)
            with jq.store.read() as conn:
                (lease_until,) = conn.execute(
                    select(deliveries_table.c.lease_until).where(
                        deliveries_table.c.event_id == queued.id
                    )
                ).scalars()
            one.send_signal(signal.SIGKILL)
            one.wait(10)
            killed_at = time.time()
            two = _start(env, daemon_log)
            wait_until(lambda: len(log.read_text().splitlines()) >= 2, timeout=60)
            second_pid, second_event, second_at = json.loads(log.read_text().splitlines()[1])
            assert (second_pid, second_event) == (two.pid, queued.id)
            assert second_at < lease_until  # taken over, not waited out
            assert second_at - killed_at < jq.settings.daemon_timeout
            hold.unlink()  # the lane goes on: the job's later events follow, in order
            # (Daemon one may have died holding the batch too: that lease is waited out.)
            wait_until(lambda: jq.get(job.id).done, timeout=120)
            wait_until(lambda: len(log.read_text().splitlines()) >= 4, timeout=60)
            types = [
                next(e.type for e in jq.events(job.id) if e.id == json.loads(line)[1])
                for line in log.read_text().splitlines()
            ]
            assert types == ["job.queued", "job.queued", "job.running", "job.completed"]
        finally:
            hold.unlink(missing_ok=True)
            if one.poll() is None:
                one.kill()
            if two is not None:
                assert _terminate(two, daemon_log) == 0, daemon_log.read_text()[-3000:]
        rows = _rows(jq.store)
        assert rows[_owner_of(rows, two.pid)].stopped_at is not None  # type: ignore[attr-defined]
        assert rows[_owner_of(rows, one.pid)].stopped_at is None  # type: ignore[attr-defined]
        jq.close()


def _owner_of(rows: dict[str, object], pid: int) -> str:
    (owner,) = [name for name, row in rows.items() if row.pid == pid]  # type: ignore[attr-defined]
    return owner
