"""The outbox dispatcher: fan-out, in-order delivery per job, retries, leases, at least once."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import uvicorn
from sqlalchemy import insert, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from jobqueue.hooks.dispatcher import Dispatcher
from jobqueue.hooks.signing import WebhookVerificationError, generate_secret, verify
from jobqueue.hooks.sinks import DeliveryError, PythonSink, WebhookSink
from jobqueue.store import Store, outbox
from jobqueue.store.tables import deliveries_table, delivery_attempts_table, events_table
from tests.factories import insert_job_with_batch

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A Python sink target: records every call; fails as `fail(event, call_number)` says."""

    def __init__(self, fail: Callable[[dict[str, Any], int], bool] | None = None) -> None:
        self.fail = fail
        self.calls: list[dict[str, Any]] = []
        self.ok: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append(event)
            number = len(self.calls)
        if self.fail is not None and self.fail(event, number):
            raise RuntimeError(f"refused call {number}")
        with self.lock:
            self.ok.append(event)

    def ok_ids(self) -> list[str]:
        return [e["id"] for e in self.ok]


def sink(
    recorder: Recorder, patterns: str | list[str] = "*", name: str = "py", **kwargs: Any
) -> PythonSink:
    return PythonSink(recorder, patterns, name=name, **kwargs)


def emit(store: Store, job_id: str | None, *types: str) -> list[str]:
    """Events in one transaction, in the order given; returns their ids."""
    with store.write() as conn:
        return [store.add_event(conn, t, job_id=job_id) for t in types]


def drain(*dispatchers: Dispatcher, rounds: int = 200, pause: float = 0.0) -> None:
    """Rounds until nothing is pending any more."""
    for _ in range(rounds):
        for dispatcher in dispatchers:
            dispatcher.run_once()
        if dispatchers[0].pending_count() == 0:
            return
        if pause:
            time.sleep(pause)
    raise AssertionError("deliveries still pending after all rounds")


def statuses(store: Store) -> Counter[str]:
    with store.read() as conn:
        return Counter(row.status for row in conn.execute(select(deliveries_table)).all())


@pytest.fixture
def started(store: Store) -> Iterator[list[Dispatcher]]:
    """Dispatchers a test makes, closed after it."""
    made: list[Dispatcher] = []
    yield made
    for dispatcher in made:
        dispatcher.close()


def make(
    store: Store, started: list[Dispatcher], sinks: list[Any], owner: str = "d1", **kwargs: Any
) -> Dispatcher:
    kwargs.setdefault("backoff_base", 0.001)
    dispatcher = Dispatcher(store, sinks, owner, **kwargs)
    started.append(dispatcher)
    return dispatcher


# -- fan-out ----------------------------------------------------------------------------------


def test_fan_out_by_pattern(store: Store, started: list[Dispatcher]) -> None:
    jobs, completed, everything = Recorder(), Recorder(), Recorder()
    dispatcher = make(
        store,
        started,
        [
            sink(jobs, "job.*", name="jobs"),
            sink(completed, ["batch.completed", "batch.failed"], name="done"),
            sink(everything, "*", name="all"),
        ],
    )
    assert dispatcher.run_once() == 0  # cursors start here
    emit(store, "job_a", "job.queued", "batch.queued", "batch.completed", "job.completed")
    emit(store, None, "batch.overdue")
    drain(dispatcher)
    assert [e["type"] for e in jobs.ok] == ["job.queued", "job.completed"]
    assert [e["type"] for e in completed.ok] == ["batch.completed"]
    assert len(everything.ok) == 5
    assert statuses(store) == {"delivered": 8}
    first = everything.ok[0]
    assert set(first) == {"id", "type", "created_at", "job_id", "batch_id", "from", "to", "data"}
    # Fanned out once: another round adds nothing and the backlog is empty.
    assert dispatcher.fan_out() == 0
    assert dispatcher.outbox_backlog() == 0


def test_new_sink_starts_at_newest_event_unless_it_replays(
    store: Store, started: list[Dispatcher]
) -> None:
    emit(store, "job_a", "job.queued", "job.running")
    fresh, replaying = Recorder(), Recorder()
    replay_sink = sink(replaying, name="replay")
    replay_sink.replay = True  # type: ignore[attr-defined]
    dispatcher = make(store, started, [sink(fresh, name="fresh"), replay_sink])
    drain(dispatcher)
    assert fresh.ok == [] and [e["type"] for e in replaying.ok] == ["job.queued", "job.running"]
    emit(store, "job_a", "job.completed")
    drain(dispatcher)
    assert [e["type"] for e in fresh.ok] == ["job.completed"]
    assert len(replaying.ok) == 3


def test_sink_names_must_be_unique(store: Store) -> None:
    with pytest.raises(ValueError, match="unique"):
        Dispatcher(store, [sink(Recorder()), sink(Recorder())], "d1")


# -- order, retries, dead letters -------------------------------------------------------------


def test_in_order_per_job_with_retries(store: Store, started: list[Dispatcher]) -> None:
    recorder = Recorder(fail=lambda event, number: number <= 4)  # the first 4 calls fail
    dispatcher = make(store, started, [sink(recorder, max_attempts=10)], batch_size=50)
    dispatcher.run_once()
    expected: dict[str, list[str]] = defaultdict(list)
    for round_ in range(4):  # interleaved jobs, several transactions
        for job in ("job_a", "job_b", "job_c"):
            ids = emit(store, job, f"batch.step{round_}", f"batch.more{round_}")
            expected[job].extend(ids)
    drain(dispatcher, pause=0.005)
    ids = recorder.ok_ids()
    assert len(ids) == len(set(ids)) == 24  # every event exactly once after retries
    for job, wanted in expected.items():
        assert [e["id"] for e in recorder.ok if e["job_id"] == job] == wanted
    assert statuses(store) == {"delivered": 24}
    with store.read() as conn:
        attempts = conn.execute(select(delivery_attempts_table)).all()
    assert len(attempts) == 24 + 4 and sum(not a.ok for a in attempts) == 4
    assert all(a.error.startswith("RuntimeError: refused call") for a in attempts if not a.ok)


def test_a_failing_job_does_not_block_other_jobs(store: Store, started: list[Dispatcher]) -> None:
    recorder = Recorder(fail=lambda event, number: event["job_id"] == "job_bad")
    dispatcher = make(store, started, [sink(recorder, max_attempts=1000)])
    dispatcher.run_once()
    bad = emit(store, "job_bad", "job.queued", "job.running")
    good = emit(store, "job_good", "job.queued", "job.running", "job.completed")
    for _ in range(20):
        dispatcher.run_once()
        time.sleep(0.002)
    assert recorder.ok_ids() == good
    # The bad job's second event waits behind its first: in order, never skipped ahead.
    assert {e["id"] for e in recorder.calls if e["job_id"] == "job_bad"} == {bad[0]}
    with store.read() as conn:
        rows = {r.event_id: r for r in outbox.deliveries_for(conn, "job_bad")}
    assert rows[bad[0]].attempts >= 2 and rows[bad[1]].attempts == 0


def test_dead_after_max_attempts_then_redeliver(store: Store, started: list[Dispatcher]) -> None:
    failing = True
    recorder = Recorder(fail=lambda event, number: failing)
    dispatcher = make(store, started, [sink(recorder, max_attempts=3)])
    dispatcher.run_once()
    first, second = emit(store, "job_a", "job.queued", "job.running")
    drain(dispatcher, pause=0.005)
    # Dead-lettered after 3 attempts; the job's next event then goes ahead (and dies too).
    assert len(recorder.calls) == 6 and recorder.ok == []
    dead = dispatcher.dead_deliveries()
    assert [(d.event_id, d.attempts, d.status) for d in dead] == [
        (first, 3, "dead"),
        (second, 3, "dead"),
    ]
    assert dead[0].last_error == "RuntimeError: refused call 3"
    assert dispatcher.dead_count() == 2 and dispatcher.pending_count() == 0
    failing = False
    assert dispatcher.redeliver(first) == 1
    assert dispatcher.redeliver(first) == 0  # already pending
    drain(dispatcher)
    assert recorder.ok_ids() == [first]
    assert dispatcher.dead_count() == 1
    assert dispatcher.redeliver(second, sink="other") == 0
    assert dispatcher.redeliver(second, sink="py") == 1
    drain(dispatcher)
    assert recorder.ok_ids() == [first, second]
    # A delivered event can be sent again on purpose too.
    assert dispatcher.redeliver(first) == 1
    drain(dispatcher)
    assert recorder.ok_ids() == [first, second, first]


def test_non_retryable_failure_is_dead_at_once(store: Store, started: list[Dispatcher]) -> None:
    def refuse(event: dict[str, Any]) -> None:
        raise DeliveryError("HTTP 410: gone", retryable=False)

    dispatcher = make(store, started, [PythonSink(refuse, name="gone", max_attempts=8)])
    dispatcher.run_once()
    emit(store, "job_a", "job.queued")
    dispatcher.run_once()
    [dead] = dispatcher.dead_deliveries()
    assert dead.attempts == 1 and dead.last_error == "HTTP 410: gone"
    with store.read() as conn:
        [attempt] = conn.execute(select(delivery_attempts_table)).all()
    assert attempt.status_code == 410 and not attempt.ok


def test_retry_after_is_honoured(store: Store, started: list[Dispatcher]) -> None:
    now = [1000.0]
    calls: list[float] = []

    def busy(event: dict[str, Any]) -> None:
        calls.append(now[0])
        if len(calls) == 1:
            raise DeliveryError("HTTP 429: slow down", retry_after=30)

    dispatcher = make(store, started, [PythonSink(busy, name="busy")], clock=lambda: now[0])
    dispatcher.run_once()
    emit(store, "job_a", "job.queued")
    assert dispatcher.run_once() == 1
    now[0] += 29
    assert dispatcher.run_once() == 0
    now[0] += 2
    assert dispatcher.run_once() == 1
    assert calls == [1000.0, 1031.0] and dispatcher.pending_count() == 0


# -- several dispatchers, crashes, leases -----------------------------------------------------


def test_two_dispatchers_never_deliver_the_same_attempt_twice(
    db_url: str, store: Store, started: list[Dispatcher]
) -> None:
    recorder = Recorder()
    other_store = Store(db_url)
    try:
        one = make(store, started, [sink(recorder)], "d1", batch_size=10)
        two = make(other_store, started, [sink(recorder)], "d2", batch_size=10)
        one.run_once()
        expected = []
        for job in range(20):
            expected += emit(store, f"job_{job}", "job.queued", "job.running", "job.completed")
        errors: list[BaseException] = []

        def loop(dispatcher: Dispatcher) -> None:
            try:
                for _ in range(500):
                    dispatcher.run_once()
                    if dispatcher.pending_count() == 0 and dispatcher.outbox_backlog() == 0:
                        return
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(d,)) for d in (one, two)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        ids = recorder.ok_ids()
        assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
        with store.read() as conn:
            attempts = conn.execute(select(delivery_attempts_table)).all()
        assert len(attempts) == len(expected)
        assert one.stats["delivered"] + two.stats["delivered"] == len(expected)
        assert one.stats["lost_lease"] == two.stats["lost_lease"] == 0
        for job in range(20):
            got = [e["type"] for e in recorder.ok if e["job_id"] == f"job_{job}"]
            assert got == ["job.queued", "job.running", "job.completed"]
    finally:
        other_store.close()


def test_crash_between_delivery_and_recording_delivers_again(
    store: Store, started: list[Dispatcher]
) -> None:
    now = [1000.0]
    recorder = Recorder()
    crashed = make(store, started, [sink(recorder)], "crashed", clock=lambda: now[0])
    crashed.run_once()
    [event_id] = emit(store, "job_a", "job.queued")
    # Delivered, then "killed" before the attempt is recorded.
    crashed._record_all = lambda *args, **kwargs: None  # type: ignore[method-assign]
    assert crashed.run_once() == 1 and recorder.ok_ids() == [event_id]
    with store.read() as conn:
        [row] = conn.execute(select(deliveries_table)).all()
    assert row.status == "pending" and row.lease_owner == "crashed"

    survivor = make(store, started, [sink(recorder)], "survivor", clock=lambda: now[0])
    assert survivor.run_once() == 0  # the lease still holds
    now[0] += 61
    assert survivor.run_once() == 1
    assert recorder.ok_ids() == [event_id, event_id]  # at least once, never lost
    assert statuses(store) == {"delivered": 1}


def test_lost_lease_cannot_overwrite_the_new_owner(store: Store, started: list[Dispatcher]) -> None:
    now = [1000.0]
    slow = threading.Event()

    def stalls(event: dict[str, Any]) -> None:
        if not slow.is_set():
            slow.set()
            now[0] += 120  # the attempt outlives its lease (and is then recorded as failed)
            raise RuntimeError("late failure")

    first = make(store, started, [PythonSink(stalls, name="py")], "first", clock=lambda: now[0])
    first.run_once()
    emit(store, "job_a", "job.queued")
    real_record = first._record_all

    def record_after_takeover(*args: Any) -> None:
        # Before the first records, a second dispatcher claims the expired lease and delivers.
        second = make(store, started, [sink(Recorder())], "second", clock=lambda: now[0])
        assert second.run_once() == 1
        real_record(*args)

    first._record_all = record_after_takeover  # type: ignore[method-assign]
    first.run_once()
    assert first.stats["lost_lease"] == 1
    assert statuses(store) == {"delivered": 1}


def test_gap_in_seqs_waits_then_late_event_is_still_fanned_out(
    store: Store, started: list[Dispatcher]
) -> None:
    now = [1000.0]
    recorder = Recorder()
    dispatcher = make(store, started, [sink(recorder)], clock=lambda: now[0], gap_grace=5)
    dispatcher.run_once()
    [before] = emit(store, "job_a", "job.queued")
    with store.read() as conn:
        base = outbox.max_event_seq(conn)

    def put(seq: int, type_: str) -> str:
        with store.write() as conn:
            conn.execute(
                insert(events_table).values(
                    seq=seq, id=f"evt_{seq}", type=type_, created_at=now[0], job_id="job_b", data={}
                )
            )
        return f"evt_{seq}"

    # seq base+1 is "still being committed" by a slow transaction: base+2 must wait for it.
    after = put(base + 2, "job.running")
    drain(dispatcher)
    assert recorder.ok_ids() == [before]
    now[0] += 6  # past the grace: the gap is taken for a rolled-back transaction
    drain(dispatcher)
    assert recorder.ok_ids() == [before, after]
    late = put(base + 1, "job.queued")  # ...but it did commit, late: still delivered
    drain(dispatcher)
    assert recorder.ok_ids() == [before, after, late]
    assert dispatcher.stats["late_events"] == 1
    drain(dispatcher)
    assert len(recorder.ok) == 3


# -- concurrency between sinks ----------------------------------------------------------------


def test_slow_sink_does_not_delay_another_sink(store: Store, started: list[Dispatcher]) -> None:
    fast = Recorder()
    slow_calls: list[float] = []

    def slow(event: dict[str, Any]) -> None:
        slow_calls.append(time.monotonic())
        time.sleep(0.5)

    dispatcher = make(
        store,
        started,
        [PythonSink(slow, name="slow", timeout=1), sink(fast, name="fast")],
        workers=4,
    )
    dispatcher.run_once()
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop, 0.05))
    thread.start()
    try:
        for job in range(10):
            emit(store, f"job_{job}", "job.queued")
            dispatcher.wake()
        begun = time.monotonic()
        while len(fast.ok) < 10 and time.monotonic() - begun < 5:
            time.sleep(0.01)
        elapsed = time.monotonic() - begun
        assert len(fast.ok) == 10
        # 10 slow events take >= 2.5 s on two lanes; the fast sink was done long before.
        assert elapsed < 1.0 and len(slow_calls) <= 4
    finally:
        stop.set()
        thread.join(timeout=10)


# -- webhooks against a real receiver ---------------------------------------------------------

SECRET = generate_secret()


class Receiver:
    """A Starlette app on 127.0.0.1:0 that verifies signatures and fails its first N calls."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls = 0
        self.accepted: list[dict[str, Any]] = []
        self.rejected: list[str] = []
        app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        self.calls += 1
        if self.calls <= self.fail_first:
            return PlainTextResponse("not yet", status_code=503)
        try:
            verify(SECRET, request.headers, body)
        except WebhookVerificationError as exc:
            self.rejected.append(exc.reason)
            return PlainTextResponse(exc.reason, status_code=400)
        event = orjson.loads(body)
        assert request.headers["webhook-id"] == event["id"]
        self.accepted.append(event)
        await asyncio.sleep(0)
        return JSONResponse({"ok": True})

    def __enter__(self) -> Receiver:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "receiver down"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def test_webhook_sink_end_to_end_with_a_failing_receiver(
    store: Store, started: list[Dispatcher]
) -> None:
    with Receiver(fail_first=3) as receiver:
        webhook = WebhookSink(receiver.url, SECRET, "*", timeout=5, name="webhook:test")
        dispatcher = make(store, started, [webhook], backoff_base=0.01)
        dispatcher.run_once()
        stop = threading.Event()
        thread = threading.Thread(target=dispatcher.run_forever, args=(stop, 0.05))
        thread.start()
        try:
            jobs = []
            for _ in range(3):
                job_id, batch_id = insert_job_with_batch(store, "queued")
                jobs.append((job_id, batch_id))
                dispatcher.wake()
            for source, dest in [("queued", "submitting"), ("submitting", "validating")]:
                for _job_id, batch_id in jobs:
                    with store.write() as conn:
                        assert store.transition_batch(conn, batch_id, source, dest) is not None
                    dispatcher.wake()
            with store.read() as conn:
                expected = [e for e in store.events(conn) if e.job_id in {j for j, _ in jobs}]
            assert len(expected) == 12
            deadline = time.monotonic() + 15
            while len(receiver.accepted) < len(expected) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
            thread.join(timeout=10)
            dispatcher.close()  # lanes finish recording what they delivered
            webhook.close()
        ids = [e["id"] for e in receiver.accepted]
        assert sorted(ids) == sorted(e.id for e in expected)  # every event exactly once
        assert len(ids) == len(set(ids))
        assert receiver.rejected == [] and receiver.calls == len(expected) + 3
        for job_id, _ in jobs:
            assert [e["id"] for e in receiver.accepted if e["job_id"] == job_id] == [
                e.id for e in expected if e.job_id == job_id
            ]
        assert statuses(store) == {"delivered": 12}
        with store.read() as conn:
            codes = Counter(a.status_code for a in conn.execute(select(delivery_attempts_table)))
        assert codes == {None: 12, 503: 3}
