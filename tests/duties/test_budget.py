"""Budgets through the duties, against the in-memory remote: a budget stops submission (a
problem, one `job.budget_exceeded`), counting what ran and what is in flight, also a batch
another daemon has just claimed; it resumes when the budget is raised. And usage in the events
of a batch's and a job's end, and in the Prometheus metrics."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from jobqueue.core.costs import Usage
from jobqueue.duties import budget
from jobqueue.duties.budget import RECHECK_SECONDS
from jobqueue.duties.collect import collect_once
from jobqueue.duties.reconcile import reconcile_once
from jobqueue.duties.submit import claim_next, submit_once
from jobqueue.service.server import MetricsCollector
from tests.duties.conftest import CALL_TIMEOUT, ENDPOINT, World
from tests.factories import chat_file, chat_line, write_jsonl

# $1 per thousand input tokens, $2 per thousand output: a batch of these costs cents.
PRICES = {"priced-model": {"input": 1000.0, "cached_input": 250.0, "output": 2000.0}}
MAX_TOKENS = 50


def _submit(world: World, n: int, per_batch: int, **options: Any) -> Any:
    lines = [chat_line(i, "priced-model") for i in range(n)]
    for line in lines:
        line["body"]["max_tokens"] = MAX_TOKENS
    source = write_jsonl(world.tmp_path / f"in-{len(world.jq.jobs())}.jsonl", lines)
    return world.jq.submit(source, ENDPOINT, max_batch_requests=per_batch, **options)


def _estimate(world: World, batch_id: str) -> float:
    """A batch's estimate: its input tokens and its most output tokens, priced."""
    row = world.row(batch_id)
    assert row.max_output_tokens == MAX_TOKENS * row.request_count
    return (row.estimated_tokens * 1000.0 + row.max_output_tokens * 2000.0) / 1e6


def _statuses(world: World, job_id: str) -> list[str]:
    return [b.status for b in world.job(job_id).batches]


def test_a_budget_stops_submission_and_resumes_when_raised(make_world: Any) -> None:
    world = make_world(prices=PRICES)
    probe = _submit(world, 6, 2, max_cost=1000.0)
    each = _estimate(world, probe.batches[0].id)
    world.jq.cancel(probe.id)
    # Room for two batches' estimates, not three.
    job = _submit(world, 6, 2, max_cost=2.5 * each)
    ctx = world.ctx()
    assert submit_once(ctx) == 2
    assert _statuses(world, job.id) == ["validating", "validating", "queued"]
    held = world.job(job.id)
    assert held.problem_kind == "budget" and "budget" in (held.problem or "")
    assert held.needs_operator  # a one-shot run stops on it rather than wait for ever
    assert world.event_types(job.id).count("job.budget_exceeded") == 1
    (exceeded,) = [e for e in world.jq.events(job.id) if e.type == "job.budget_exceeded"]
    assert exceeded.data["max_cost"] == pytest.approx(2.5 * each)
    assert exceeded.data["spent"] == 0 and exceeded.data["in_flight"] == pytest.approx(2 * each)
    assert exceeded.data["next_batch_estimate"] == pytest.approx(each, rel=0.2)

    # Looked at again later: still over, and no second event.
    world.clock.advance(RECHECK_SECONDS + 1)
    assert submit_once(ctx) == 0
    assert world.event_types(job.id).count("job.budget_exceeded") == 1

    # The first two run and are collected, each at its estimate's worth of usage (what the
    # responses' usage sums to): what ran still leaves no room for the third.
    first, second, third = world.job(job.id).batches
    for batch in (first, second):
        world.remote.complete(world.row(batch.id).remote_id)
    reconcile_once(ctx)
    assert collect_once(ctx) == 2
    # The batches used what was estimated (the in-memory remote's own lines use fewer tokens).
    for batch in (first, second):
        row = world.row(batch.id)
        with world.store.write() as conn:
            world.store.update_batch(
                conn, batch.id, input_tokens=row.estimated_tokens, cached_input_tokens=0,
                output_tokens=row.max_output_tokens, reasoning_tokens=0,
            )  # fmt: skip
    world.clock.advance(RECHECK_SECONDS + 1)
    assert submit_once(ctx) == 0
    assert world.job(job.id).cost == pytest.approx(2 * each)

    # Raised: the problem goes, and the third batch is submitted at once.
    raised = world.jq.set_budget(job.id, 4 * each)
    assert raised.max_cost == pytest.approx(4 * each) and raised.problem is None
    assert submit_once(ctx) == 1
    assert world.row(third.id).status == "validating"
    assert world.event_types(job.id).count("job.budget_exceeded") == 1


def test_what_another_daemon_just_claimed_counts_against_the_budget(make_world: Any) -> None:
    world = make_world(prices=PRICES)
    probe = _submit(world, 4, 2, max_cost=1000.0)
    each = _estimate(world, probe.batches[0].id)
    world.jq.cancel(probe.id)
    job = _submit(world, 4, 2, max_cost=1.5 * each)
    one, two = world.ctx("daemon-1"), world.ctx("daemon-2")
    claimed = claim_next(one)  # claimed, not submitted yet: in flight all the same
    assert claimed is not None and claimed[0].status == "submitting"
    assert claim_next(two) is None
    assert sorted(_statuses(world, job.id)) == ["queued", "submitting"]
    assert world.job(job.id).problem_kind == "budget"


def test_two_daemons_cannot_both_pass_the_budget_check(
    make_world: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon 1 stops inside its budget check (after counting, before claiming) while daemon 2
    checks the same job: 2 must wait for 1's claim and count it, so one batch goes, not two."""
    world = make_world(prices=PRICES)
    probe = _submit(world, 4, 2, max_cost=1000.0)
    each = _estimate(world, probe.batches[0].id)
    world.jq.cancel(probe.id)
    job = _submit(world, 4, 2, max_cost=1.5 * each)
    one, two = world.ctx("daemon-1", own_store=True), world.ctx("daemon-2", own_store=True)
    counted, go_on = threading.Event(), threading.Event()
    job_spending = budget.costs.job_spending

    def paused(conn: Any, prices: Any, job_id: str) -> Any:
        found = job_spending(conn, prices, job_id)
        if threading.current_thread().name == "daemon-1":
            counted.set()
            assert go_on.wait(CALL_TIMEOUT)
        return found

    monkeypatch.setattr(budget.costs, "job_spending", paused)
    claimed: dict[str, Any] = {}

    def claim(ctx: Any) -> None:
        claimed[ctx.owner] = claim_next(ctx)

    first = threading.Thread(target=claim, args=(one,), name="daemon-1")
    first.start()
    assert counted.wait(CALL_TIMEOUT)
    second = threading.Thread(target=claim, args=(two,), name="daemon-2")
    second.start()
    second.join(0.5)  # give it time to reach the check (it must wait there for daemon 1)
    go_on.set()
    first.join(CALL_TIMEOUT)
    second.join(CALL_TIMEOUT)
    assert claimed["daemon-1"] is not None and claimed["daemon-2"] is None
    assert sorted(_statuses(world, job.id)) == ["queued", "submitting"]


def test_a_collected_batch_priced_by_its_usage_frees_the_rest_of_its_estimate(
    make_world: Any,
) -> None:
    world = make_world(prices=PRICES)
    job = _submit(world, 4, 2)  # without a budget: its batches are estimated all the same
    first, second = job.batches
    assert world.row(first.id).max_output_tokens == 2 * MAX_TOKENS
    each = _estimate(world, first.id)
    world.jq.set_budget(job.id, 1.5 * each)
    ctx = world.ctx()
    assert submit_once(ctx) == 1
    world.remote.complete(world.row(first.id).remote_id)
    reconcile_once(ctx)
    with world.store.write() as conn:  # it wrote little: far below its bound
        world.store.update_batch(conn, first.id, input_tokens=10, cached_input_tokens=0,
                                 output_tokens=5, reasoning_tokens=0)  # fmt: skip
    collect_once(ctx)
    world.clock.advance(RECHECK_SECONDS + 1)
    assert submit_once(ctx) == 1
    assert world.row(second.id).status == "validating"


def test_the_enqueued_token_limit_per_model(make_world: Any) -> None:
    world = make_world(enqueued_token_limit={"priced-model": 1, "*": 10**9})
    job = _submit(world, 4, 2)
    other = world.submit(4, max_batch_requests=2)  # gpt-4o-mini: under the "*" limit
    assert submit_once(world.ctx()) == 3
    assert _statuses(world, job.id) == ["validating", "queued"]  # one at a time
    assert _statuses(world, other.id) == ["validating", "validating"]


def test_usage_in_the_events_of_a_batch_and_a_job_that_end(world: World) -> None:
    job = world.submit(3)
    (batch,) = job.batches
    ctx = world.ctx()
    submit_once(ctx)
    remote = world.remote.complete(world.row(batch.id).remote_id)
    reconcile_once(ctx)
    (ended,) = [e for e in world.jq.events(job.id) if e.type == "batch.completed"]
    # At the batch's end only the remote's own usage is known: the event carries it, priced.
    remote_usage = Usage.of_remote(remote.usage)
    assert remote_usage is not None and remote_usage.input_tokens > 0
    assert ended.data["usage"] == remote_usage.to_dict()
    assert ended.data["usage_source"] == "remote"
    prices = world.settings.price_table()
    assert ended.data["cost"] == pytest.approx(prices.cost("gpt-4o-mini", remote_usage))

    # Collected (the usage set here stands for what collection sums), the job ends: its
    # event carries the collected tokens and their cost.
    with world.store.write() as conn:
        world.store.update_batch(conn, batch.id, input_tokens=1000, cached_input_tokens=200,
                                 output_tokens=300, reasoning_tokens=0)  # fmt: skip
    collect_once(ctx)
    done = world.job(job.id)
    assert done.status == "completed" and done.usage is not None
    (completed,) = [e for e in world.jq.events(job.id) if e.type == "job.completed"]
    assert completed.data["usage"] == done.usage.to_dict()
    assert completed.data["usage_source"] == "collected"
    assert completed.data["cost"] == pytest.approx(done.cost)
    assert done.cost == pytest.approx(prices.cost("gpt-4o-mini", done.usage))


class _Daemon:
    """What the metrics collector reads of a daemon."""

    def __init__(self, world: World) -> None:
        self.store = world.store
        self.sinks: list[Any] = []
        self.stats: dict[str, Any] = {}
        self.ctx = world.ctx()
        self.leading = True

    def duty_states(self) -> dict[str, Any]:
        return {}


def test_metrics_report_tokens_by_model_and_kind(make_world: Any) -> None:
    world = make_world(prices=PRICES)
    priced = _submit(world, 2, 2)
    plain = world.submit(2)
    source = chat_file(world.tmp_path / "mystery.jsonl", 2, model="mystery-model")
    unpriced = world.jq.submit(source, ENDPOINT)
    with world.store.write() as conn:
        world.store.update_batch(
            conn,
            priced.batches[0].id,
            input_tokens=1000,
            cached_input_tokens=100,
            output_tokens=50,
            reasoning_tokens=7,
        )
        for job in (plain, unpriced):
            world.store.update_batch(
                conn,
                job.batches[0].id,
                input_tokens=10,
                cached_input_tokens=0,
                output_tokens=0,
                reasoning_tokens=0,
            )
    registry = CollectorRegistry()
    registry.register(MetricsCollector(_Daemon(world)))  # type: ignore[arg-type]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    key = "jobqueue_tokens_total"
    assert samples[(key, (("kind", "input"), ("model", "priced-model")))] == 1000
    assert samples[(key, (("kind", "cached_input"), ("model", "priced-model")))] == 100
    assert samples[(key, (("kind", "output"), ("model", "priced-model")))] == 50
    assert samples[(key, (("kind", "reasoning"), ("model", "priced-model")))] == 7
    assert samples[(key, (("kind", "input"), ("model", "gpt-4o-mini")))] == 10
    assert samples[(key, (("kind", "input"), ("model", "mystery-model")))] == 10
    cost = samples[("jobqueue_cost_usd_total", (("model", "priced-model"),))]
    assert cost == pytest.approx((900 * 1000.0 + 100 * 250.0 + 50 * 2000.0) / 1e6)
    assert ("jobqueue_cost_usd_total", (("model", "gpt-4o-mini"),)) in samples
    # A model without a price has no cost series: unknown, never 0.
    assert ("jobqueue_cost_usd_total", (("model", "mystery-model"),)) not in samples
