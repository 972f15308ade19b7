"""Tokens by batch and job: `usage_by_job_and_model` sums collected batches by job and model;
the remote's usage is compared kind by kind."""

from __future__ import annotations

from jobqueue.core.costs import Usage
from jobqueue.store import Store
from jobqueue.store.costs import ModelUsage, usage_by_job_and_model
from jobqueue.store.usage import record_batch_tokens, usage_mismatch
from tests.store.helpers import add_job

KINDS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")


def test_usage_sums_collected_batches_by_job_and_model(store: Store) -> None:
    job_id, [a, b, c, d] = add_job(
        store,
        {"status": "completed", "model": "gpt-4o-mini"},
        {"status": "completed", "model": "gpt-4o-mini"},
        {"status": "completed", "model": "o4-mini"},
        {"status": "in_progress", "model": "o4-mini"},  # not collected: counts nothing
    )
    other, [e] = add_job(store, {"status": "completed", "model": "gpt-4o-mini"})
    with store.write() as conn:
        assert usage_by_job_and_model(conn, [job_id]) == []
        record_batch_tokens(conn, a, dict(zip(KINDS, (100, 10, 5, 0), strict=True)))
        record_batch_tokens(conn, b, dict(zip(KINDS, (50, 0, 7, 1), strict=True)))
        record_batch_tokens(conn, c, dict(zip(KINDS, (3, 0, 30, 20), strict=True)))
        record_batch_tokens(conn, e, dict(zip(KINDS, (999, 0, 0, 0), strict=True)))
    with store.read() as conn:
        assert usage_by_job_and_model(conn, [job_id]) == [
            ModelUsage(job_id, "gpt-4o-mini", Usage(150, 10, 12, 1), batches=2),
            ModelUsage(job_id, "o4-mini", Usage(3, 0, 30, 20), batches=1),
        ]
        both = usage_by_job_and_model(conn, [other, job_id])
        assert [(u.job_id, u.model) for u in both] == sorted(
            [(job_id, "gpt-4o-mini"), (job_id, "o4-mini"), (other, "gpt-4o-mini")]
        )
        assert both[[u.job_id for u in both].index(other)].usage == Usage(999, 0, 0, 0)
    assert d


def test_usage_mismatch_names_the_kinds_that_differ() -> None:
    summed = dict(zip(KINDS, (100, 10, 5, 0), strict=True))
    remote = {
        "input_tokens": 100,
        "input_tokens_details": {"cached_tokens": 10},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 106,
    }
    assert usage_mismatch(summed, remote) == {"output_tokens": (5, 6)}
    assert usage_mismatch(summed, {**remote, "output_tokens": 5}) == {}
    assert usage_mismatch(summed, {"input_tokens": 100}) == {}  # only what it gives
    assert usage_mismatch(summed, None) == {}
    assert usage_mismatch(summed, {"total_tokens": 105}) == {}
