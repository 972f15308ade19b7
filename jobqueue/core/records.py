"""Plain typed objects handed to users of the embedded API and printed by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jobqueue.core.costs import (
    CostEstimate,
    PriceTable,
    Usage,
    round_usd,
    submitted_estimate,
    sum_costs,
)
from jobqueue.core.states import JOB_TERMINAL
from jobqueue.core.times import iso


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


@dataclass(frozen=True)
class RequestCounts:
    total: int
    completed: int
    failed: int

    @property
    def done(self) -> int:
        return self.completed + self.failed

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed}


_BATCH_TIMES = (
    "created_at",
    "submitting_at",
    "validating_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "expires_at",
    "collected_at",
)


@dataclass(frozen=True)
class Batch:
    """One remote batch of a job: a shard of the input, or a retry of failed requests."""

    id: str
    job_id: str
    status: str
    attempt: int
    shard_index: int
    model: str | None
    remote_id: str | None
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    request_counts: RequestCounts
    last_error: str | None
    cancel_requested: bool
    times: dict[str, datetime | None] = field(default_factory=dict)
    # Tokens summed over the batch's responses when it was collected (None until then), what
    # they cost at the price table's prices (None: not collected, or the model has no price),
    # and the estimate it was queued with: input tokens, and the most output tokens its
    # requests allow (None: some request sets no bound).
    usage: Usage | None = None
    cost: float | None = None
    estimated_input_tokens: int = 0
    max_output_tokens: int | None = None
    # The remote batch object's own usage, as it reported it (None: it reported none).
    remote_usage: Usage | None = None
    # The estimate priced: its tokens and cost range (None when read without a price table).
    estimate: CostEstimate | None = None

    @property
    def created_at(self) -> datetime:
        created = self.times["created_at"]
        assert created is not None
        return created

    @classmethod
    def from_row(cls, row: Any, prices: PriceTable | None = None) -> Batch:
        usage = Usage.of_row(row)
        return cls(
            id=row.id,
            job_id=row.job_id,
            status=row.status,
            attempt=row.attempt,
            shard_index=row.shard_index,
            model=row.model,
            remote_id=row.remote_id,
            input_file_id=row.input_file_id,
            output_file_id=row.output_file_id,
            error_file_id=row.error_file_id,
            request_counts=RequestCounts(
                row.remote_total or row.request_count, row.remote_completed, row.remote_failed
            ),
            last_error=row.last_error,
            cancel_requested=bool(row.cancel_requested),
            times={name: _dt(getattr(row, name)) for name in _BATCH_TIMES},
            usage=usage,
            cost=prices.cost(row.model, usage) if prices is not None else None,
            estimated_input_tokens=int(row.estimated_tokens or 0),
            max_output_tokens=row.max_output_tokens,
            remote_usage=Usage.of_remote(row.usage),
            estimate=CostEstimate.of_batch(prices, row) if prices is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "remote_id": self.remote_id,
            "status": self.status,
            "attempt": self.attempt,
            "shard_index": self.shard_index,
            "model": self.model,
            "request_counts": self.request_counts.to_dict(),
            "input_file_id": self.input_file_id,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "last_error": self.last_error,
            "usage": self.usage.to_dict() if self.usage is not None else None,
            "cost": round_usd(self.cost),
            "remote_usage": self.remote_usage.to_dict() if self.remote_usage else None,
            "estimated_input_tokens": self.estimated_input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "estimated_cost": _estimated_cost(self.estimate),
            **{name: _iso(value) for name, value in self.times.items()},
        }


@dataclass(frozen=True)
class Job:
    """The user's unit of work: one input file, one result per request."""

    id: str
    status: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str]
    max_attempts: int
    source: str
    bytes: int
    request_counts: RequestCounts
    cancel_requested: bool
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime | None
    purged_at: datetime | None = None
    batches: tuple[Batch, ...] = ()
    # Given at submit (`--name`); the job can be found by it.
    name: str | None = None
    # Why the open job is not moving (a key refused, the remote down), its kind, and since when.
    problem: str | None = None
    problem_kind: str | None = None
    problem_at: datetime | None = None
    # The job whose failed requests this one retries.
    retry_of: str | None = None
    # The shortest unique form of the id to show and type (set by `JobQueue.get` and `jobs`).
    short_id: str | None = None
    # Tokens of the batches collected so far, by model (None for a model: none collected with
    # its usage yet), and what they cost (`cost`: None while nothing is collected, or when a
    # model has no price); the job's budget in USD (None: none).
    usage_by_model: dict[str | None, Usage] = field(default_factory=dict)
    cost_by_model: dict[str | None, float | None] = field(default_factory=dict)
    max_cost: float | None = None
    # What the job was estimated to cost when it was submitted (`submitted_estimate`: its
    # input's shards, retries not counted); None when read without a price table.
    estimate: CostEstimate | None = None

    @property
    def usage(self) -> Usage | None:
        """The tokens of every batch collected so far, summed; None while none is."""
        if not self.usage_by_model:
            return None
        total = Usage()
        for usage in self.usage_by_model.values():
            total = total + usage
        return total

    @property
    def cost(self) -> float | None:
        """What the batches collected so far cost; None while none is, or when a model of
        theirs has no price (unknown, never 0)."""
        if not self.cost_by_model:
            return None
        return sum_costs(self.cost_by_model.values())

    @property
    def done(self) -> bool:
        return self.status in JOB_TERMINAL

    @property
    def needs_operator(self) -> bool:
        """The job's problem does not pass by itself (a key, a permission, a quota)."""
        from jobqueue.core.problems import NEEDS_OPERATOR

        return not self.done and self.problem_kind in NEEDS_OPERATOR

    @property
    def remote_counts(self) -> RequestCounts:
        """Requests the remote has finished, as its batches report them: the final outcomes
        collected so far, plus what the remote counts done in batches not collected yet.
        Ahead of `request_counts`, which counts only collected outcomes."""
        completed, failed = self.request_counts.completed, self.request_counts.failed
        for batch in self.batches:
            if batch.times.get("collected_at") is None:
                completed += batch.request_counts.completed
                failed += batch.request_counts.failed
        return RequestCounts(self.request_counts.total, completed, failed)

    @classmethod
    def from_row(
        cls,
        row: Any,
        batches: list[Any] | None = None,
        *,
        prices: PriceTable | None = None,
        usage: dict[str | None, Usage] | None = None,
        estimate: CostEstimate | None = None,
    ) -> Job:
        """The job of a row; with `prices`, its cost from `usage` (model -> collected tokens),
        or from its batches' usage when not given, and its estimate (`estimate`, else from its
        batches)."""
        if usage is None:
            usage = {}
            for b in batches or ():
                found = Usage.of_row(b)
                if found is not None:
                    usage[b.model] = usage.get(b.model, Usage()) + found
        costs = {m: prices.cost(m, u) for m, u in usage.items()} if prices is not None else {}
        if estimate is None and prices is not None and batches:
            estimate = submitted_estimate(prices, batches)
        return cls(
            id=row.id,
            status=row.status,
            endpoint=row.endpoint,
            completion_window=row.completion_window,
            metadata=dict(row.user_metadata or {}),
            max_attempts=row.max_attempts,
            source=row.source,
            bytes=row.bytes,
            request_counts=RequestCounts(
                row.request_count, row.requests_succeeded, row.requests_failed
            ),
            cancel_requested=bool(row.cancel_requested),
            error=row.error,
            created_at=_dt(row.created_at),  # type: ignore[arg-type]
            started_at=_dt(row.started_at),
            finished_at=_dt(row.finished_at),
            deadline_at=_dt(row.deadline_at),
            purged_at=_dt(row.purged_at),
            batches=tuple(Batch.from_row(b, prices) for b in batches or ()),
            name=row.name,
            problem=row.problem,
            problem_kind=row.problem_kind,
            problem_at=_dt(row.problem_at),
            retry_of=row.retry_of,
            usage_by_model=usage,
            cost_by_model=costs,
            max_cost=row.max_cost,
            estimate=estimate,
        )

    def to_dict(self) -> dict[str, Any]:
        usage = self.usage
        return {
            "id": self.id,
            "short_id": self.short_id,
            "name": self.name,
            "status": self.status,
            "problem": self.problem,
            "problem_kind": self.problem_kind,
            "problem_at": _iso(self.problem_at),
            "retry_of": self.retry_of,
            "endpoint": self.endpoint,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "deadline_at": _iso(self.deadline_at),
            "purged_at": _iso(self.purged_at),
            "completion_window": self.completion_window,
            "metadata": self.metadata,
            "max_attempts": self.max_attempts,
            "source": self.source,
            "bytes": self.bytes,
            "error": self.error,
            "request_counts": self.request_counts.to_dict(),
            "usage": usage.to_dict() if usage is not None else None,
            "cost": round_usd(self.cost),
            "max_cost": self.max_cost,
            **(self.estimate.to_data() if self.estimate is not None else _NO_ESTIMATE),
            "usage_by_model": [
                {"model": model, **u.to_dict(), "cost": round_usd(self.cost_by_model.get(model))}
                for model, u in self.usage_by_model.items()
            ],
            "batches": [b.to_dict() for b in self.batches],
        }


@dataclass(frozen=True)
class RunReport:
    """What a run of the duties did (`JobQueue.run_once`, `run_until_done`): the steps taken,
    the duties that failed (raised) with their last error, the jobs that ended during the run,
    and those still open when it stopped (with their problems)."""

    steps: int = 0
    failed_duties: dict[str, str] = field(default_factory=dict)
    ended: tuple[Job, ...] = ()
    still_open: tuple[Job, ...] = ()

    @property
    def blocked(self) -> tuple[Job, ...]:
        """Open jobs held up by a problem only the operator can fix (a key, a quota)."""
        return tuple(job for job in self.still_open if job.needs_operator)

    @property
    def all_completed(self) -> bool:
        return all(job.status == "completed" for job in self.ended)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "failed_duties": self.failed_duties,
            "ended": [_job_summary(job) for job in self.ended],
            "still_open": [_job_summary(job) for job in self.still_open],
        }


def _job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "short_id": job.short_id,
        "name": job.name,
        "status": job.status,
        "problem": job.problem,
        "request_counts": job.request_counts.to_dict(),
    }


@dataclass(frozen=True)
class ShardPlan:
    """One remote batch a submit would make (`submit --dry-run`)."""

    index: int
    model: str | None
    requests: int
    bytes: int
    input_tokens: int
    max_output_tokens: int | None  # None when some request sets no bound
    # The estimated cost at the price table's prices: input only, and with the most output
    # tokens (None: no bound, or no price for the model; `cost_min` None: no price).
    cost_min: float | None = None
    cost_max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "model": self.model,
            "requests": self.requests,
            "bytes": self.bytes,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "cost": {"min": round_usd(self.cost_min), "max": round_usd(self.cost_max)},
        }


@dataclass(frozen=True)
class ModelPlan:
    """A submit's estimate for one model: its shards' totals."""

    model: str | None
    requests: int
    input_tokens: int
    max_output_tokens: int | None
    cost_min: float | None
    cost_max: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "cost": {"min": round_usd(self.cost_min), "max": round_usd(self.cost_max)},
        }


@dataclass(frozen=True)
class SubmitPlan:
    """What `submit` would record for a file, found without recording anything."""

    source: str
    endpoint: str
    options: dict[str, Any]
    shards: tuple[ShardPlan, ...]
    duplicate_of: str | None = None  # an open job for the same file and options
    # The price table's date and source, and the budget the job would get.
    prices_date: str | None = None
    prices_source: str | None = None
    max_cost: float | None = None

    @property
    def by_model(self) -> tuple[ModelPlan, ...]:
        """The shards' estimates summed by model, in first-appearance order."""
        grouped: dict[str | None, list[ShardPlan]] = {}
        for shard in self.shards:
            grouped.setdefault(shard.model, []).append(shard)
        return tuple(
            ModelPlan(
                model,
                sum(s.requests for s in shards),
                sum(s.input_tokens for s in shards),
                _total(s.max_output_tokens for s in shards),
                sum_costs(s.cost_min for s in shards),
                sum_costs(s.cost_max for s in shards),
            )
            for model, shards in grouped.items()
        )

    @property
    def cost_min(self) -> float | None:
        return sum_costs(s.cost_min for s in self.shards)

    @property
    def cost_max(self) -> float | None:
        return sum_costs(s.cost_max for s in self.shards)

    @property
    def unpriced(self) -> tuple[str, ...]:
        """Models without a price (their cost is unknown)."""
        return tuple(
            dict.fromkeys(s.model or "(no model)" for s in self.shards if s.cost_min is None)
        )

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def input_tokens(self) -> int:
        return sum(s.input_tokens for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "endpoint": self.endpoint,
            "options": self.options,
            "batches": len(self.shards),
            "requests": self.requests,
            "bytes": self.bytes,
            "input_tokens": self.input_tokens,
            "max_output_tokens": _total(s.max_output_tokens for s in self.shards),
            "cost": {"min": round_usd(self.cost_min), "max": round_usd(self.cost_max)},
            "unpriced_models": list(self.unpriced),
            "max_cost": self.max_cost,
            "prices": {"date": self.prices_date, "source": self.prices_source},
            "by_model": [m.to_dict() for m in self.by_model],
            "duplicate_of": self.duplicate_of,
            "shards": [s.to_dict() for s in self.shards],
        }


def _total(values: Any) -> int | None:
    """The sum of some bounds; None (unbounded) when any is."""
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


@dataclass(frozen=True)
class Event:
    """One outbox event, in the payload shape hooks receive."""

    seq: int
    id: str
    type: str
    created_at: datetime
    job_id: str | None
    batch_id: str | None
    from_status: str | None
    to_status: str | None
    data: dict[str, Any]

    @classmethod
    def from_row(cls, row: Any) -> Event:
        return cls(
            seq=row.seq,
            id=row.id,
            type=row.type,
            created_at=_dt(row.created_at),  # type: ignore[arg-type]
            job_id=row.job_id,
            batch_id=row.batch_id,
            from_status=row.from_status,
            to_status=row.to_status,
            data=dict(row.data or {}),
        )

    def to_payload(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "created_at": _iso(self.created_at),
            "job_id": self.job_id,
            "batch_id": self.batch_id,
            "from": self.from_status,
            "to": self.to_status,
            "data": self.data,
        }


@dataclass(frozen=True)
class Delivery:
    """One event's delivery to one sink (`pending`, `delivered` or `dead`), as the CLI and the
    embedded API show it."""

    id: int
    event_seq: int
    event_id: str
    event_type: str
    job_id: str | None
    sink: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    delivered_at: float | None
    updated_at: float

    @classmethod
    def from_row(cls, row: Any) -> Delivery:
        return cls(
            id=row.id,
            event_seq=row.event_seq,
            event_id=row.event_id,
            event_type=row.event_type,
            job_id=row.job_id,
            sink=row.sink,
            status=row.status,
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at,
            last_error=row.last_error,
            delivered_at=row.delivered_at,
            updated_at=row.updated_at,
        )

    def summary(self) -> dict[str, Any]:
        """The short form in `jobqueue events --json`."""
        return {
            "sink": self.sink,
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "delivered_at": iso(self.delivered_at),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_seq": self.event_seq,
            "event_id": self.event_id,
            "type": self.event_type,
            "job_id": self.job_id,
            **self.summary(),
            "next_attempt_at": iso(self.next_attempt_at) if self.status == "pending" else None,
            "updated_at": iso(self.updated_at),
        }


_NO_ESTIMATE = {"estimated_input_tokens": None, "max_output_tokens": None, "estimated_cost": None}


def _estimated_cost(estimate: CostEstimate | None) -> dict[str, float | None] | None:
    return estimate.to_data()["estimated_cost"] if estimate is not None else None


def _iso(value: datetime | None) -> str | None:
    return iso(value.timestamp()) if value is not None else None


@dataclass(frozen=True)
class CostLine:
    """One group of a cost report: its key (a model, a job id, a metadata value; None for
    none), the jobs and collected batches in it, their tokens and what they cost (None: some
    model of theirs has no price)."""

    key: str | None
    jobs: int
    batches: int
    usage: Usage
    cost: float | None
    name: str | None = None  # by job: the job's name

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "jobs": self.jobs,
            "batches": self.batches,
            **self.usage.to_dict(),
            "cost": round_usd(self.cost),
        }


@dataclass(frozen=True)
class CostReport:
    """What jobs cost (`jobqueue cost`): their collected usage priced, grouped `by` model, job
    or the value of metadata key `key`."""

    by: str
    key: str | None
    since: datetime | None
    lines: tuple[CostLine, ...]
    unpriced: tuple[str, ...] = ()
    jobs: int = 0  # jobs with collected usage, across the lines

    @property
    def usage(self) -> Usage:
        total = Usage()
        for line in self.lines:
            total = total + line.usage
        return total

    @property
    def cost(self) -> float | None:
        return sum_costs(line.cost for line in self.lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "metadata_key": self.key,
            "since": _iso(self.since),
            "lines": [line.to_dict() for line in self.lines],
            "total": {"jobs": self.jobs, **self.usage.to_dict(), "cost": round_usd(self.cost)},
            "unpriced_models": list(self.unpriced),
        }
