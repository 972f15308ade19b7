"""The embedded API: `JobQueue`, the same core the CLI and the daemon use.

from jobqueue import JobQueue
jq = JobQueue()                      # defaults from the config file and the environment
job = jq.submit("requests.jsonl", endpoint="/v1/chat/completions")
"""

from __future__ import annotations

import errno
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from jobqueue import tokens
from jobqueue.core.costs import PriceTable, Usage, submitted_estimate, sum_costs
from jobqueue.core.durations import parse_duration
from jobqueue.core.ids import looks_like_id, new_id
from jobqueue.core.records import (
    CostLine,
    CostReport,
    Delivery,
    Event,
    Job,
    RunReport,
    ShardPlan,
    SubmitPlan,
)
from jobqueue.core.states import BatchStatus, JobStatus
from jobqueue.files import inputs
from jobqueue.files.fingerprint import content_sha256, fingerprint
from jobqueue.files.sharing import share_with_group
from jobqueue.logs import get_logger
from jobqueue.settings import Settings, load_settings
from jobqueue.store import DatabaseError as DatabaseError  # re-exported: the CLI catches it
from jobqueue.store import Store, costs, lookup, outbox
from jobqueue.store import StoreError as StoreError  # re-exported: the CLI catches it
from jobqueue.store.coordination import DaemonAlreadyRunning as DaemonAlreadyRunning  # the CLI too
from jobqueue.store.daemons import daemons_heard_since
from jobqueue.store.intake import RequestIndexLoader, batch_number_for
from jobqueue.store.lifecycle import request_cancel
from jobqueue.store.metrics import retried_request_count
from jobqueue.store.problems import retry_held_now
from jobqueue.store.reruns import failed_requests
from jobqueue.store.results import iter_result_lines, write_result_lines

if TYPE_CHECKING:
    from jobqueue.remote.base import Provider
    from jobqueue.service.daemon import Daemon

log = get_logger("jobqueue.api")

# What the remote accepts for one batch input file.
REMOTE_MAX_BYTES = 200 * 1024 * 1024
COMPLETION_WINDOWS = ("24h",)
# Remote metadata holds 16 pairs; jobqueue keeps two for itself (its job and batch ids).
MAX_USER_METADATA = 14
# Without a budget or an enqueued-token limit a submit estimates one request in this many (and
# each shard's first), scaled by bytes: every request's estimate would cost about as much as
# the rest of the validation (benchmarks/README.md, "estimates").
SAMPLED_ESTIMATE_EVERY = 16
RESERVED_METADATA_PREFIX = "jobqueue_"


class JobQueueError(Exception):
    """An error to show the user as one line; `exit_code` is what the CLI exits with."""

    exit_code = 1


class JobNotFound(JobQueueError):
    """No job has that id, name or prefix: bad input, exit code 2."""

    exit_code = 2

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")


class AmbiguousJob(JobQueueError):
    """A prefix that more than one job's id starts with; `matches` lists them."""

    exit_code = 2

    def __init__(self, ref: str, matches: list[Job], more: bool) -> None:
        self.matches = matches
        lines = [f"{ref!r} is ambiguous: it matches {'these' if not more else 'more'} jobs"]
        for job in matches:
            name = f"  {job.name}" if job.name else ""
            lines.append(
                f"  {job.short_id or job.id}  {job.id}  {job.status}  "
                f"{job.created_at:%Y-%m-%d %H:%M:%S}{name}"
            )
        if more:
            lines.append("  … (type more digits)")
        super().__init__("\n".join(lines))


class EventNotFound(JobQueueError):
    def __init__(self, event_id: str) -> None:
        super().__init__(f"no event {event_id!r}")


class InvalidOptions(JobQueueError):
    exit_code = 2


class DuplicateJob(InvalidOptions):
    """An open job exists for the same input file and options (`allow_duplicate` to submit
    anyway); `job` is it."""

    def __init__(self, job: Job) -> None:
        self.job = job
        named = f" ({job.name})" if job.name else ""
        super().__init__(
            f"job {job.id}{named} for the same file and options is still {job.status}: wait "
            f"for it (`jobqueue wait {job.short_id or job.id}`), or submit with "
            "--allow-duplicate to queue a second one"
        )


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
JOB_STATUSES = tuple(s.value for s in JobStatus)
OPEN_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
COST_GROUPS = ("model", "job", "metadata")


class StorageError(JobQueueError):
    """The machine refused a file operation (a full disk, a read-only mount); nothing was kept."""

    _WRITING = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

    @classmethod
    def of(cls, exc: OSError, where: Path) -> StorageError:
        reason = exc.strerror or str(exc)
        if exc.errno in cls._WRITING:
            return cls(f"cannot write the job's files in {where}: {reason}; nothing was kept")
        path = f" ({exc.filename})" if exc.filename else ""
        return cls(f"submit failed: {reason}{path}; nothing was kept")


class JobQueue:
    """A handle on one jobqueue database and data dir.

    `JobQueue(database_url=None, data_dir=None, **settings)`: any setting of `Settings` may be
    given by name; the rest come from the config file and the environment.
    """

    def __init__(
        self,
        database_url: str | None = None,
        data_dir: str | Path | None = None,
        *,
        config: str | Path | None = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = settings or load_settings(
            config, database_url=database_url, data_dir=data_dir, **overrides
        )
        self._prices: PriceTable | None = None
        self.data_dir = Path(self.settings.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        share_with_group(self.data_dir)  # a setgid data dir: files group-writable, see there
        self.store = Store(self.settings.effective_database_url)
        costs.use_prices(self.store, self.prices)  # what its events are priced with
        self._daemon: Daemon | None = None
        self._python_sinks: list[Any] = []
        self._changed = threading.Condition()

    def close(self) -> None:
        self.stop()
        self.store.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- intake -----------------------------------------------------------------------------

    def submit(
        self,
        path: str | Path,
        endpoint: str,
        *,
        completion_window: str | None = None,
        metadata: Mapping[str, str] | None = None,
        max_attempts: int | None = None,
        deadline: str | float | None = None,
        max_batch_requests: int | None = None,
        max_batch_bytes: int | None = None,
        name: str | None = None,
        allow_duplicate: bool = True,
        max_cost: float | None = None,
    ) -> Job:
        """Validate and shard a JSONL file, record the job and its batches as `queued`.

        Streams the file once (and hashes it once: the job's fingerprint is the file's sha256
        with its options). A bad file raises `inputs.InputError` naming every problem with its
        line, and nothing is recorded: no job row, no shard file. With `allow_duplicate=False`
        (what `jobqueue submit` does unless `--allow-duplicate`), a file whose job (same
        content, same options) is still open raises `DuplicateJob`.
        `name` names the job: unique, letters, digits, `.`, `_`, `-`, not hex digits alone.
        `max_cost` (USD; the config's `max_cost` when not given) is the job's budget: no batch
        is submitted past it (see `set_budget`); every model of the file needs a price then,
        else `InvalidOptions` and nothing is recorded.
        """
        options = self._options(
            endpoint, completion_window, metadata, max_attempts, deadline, max_batch_requests,
            max_batch_bytes,
        )  # fmt: skip
        return self._submit(
            Path(path), endpoint, options, name=name, allow_duplicate=allow_duplicate,
            max_cost=self._max_cost(max_cost),
        )  # fmt: skip

    def _max_cost(self, max_cost: float | None) -> float | None:
        value = max_cost if max_cost is not None else self.settings.max_cost
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
        ):
            raise InvalidOptions(f"--max-cost must be a positive amount of USD, not {value!r}")
        return None if value is None else float(value)

    def _check_priced(self, models: Iterable[str | None], max_cost: float | None) -> None:
        """A budget needs a price for every model: `InvalidOptions` naming those without."""
        if max_cost is None:
            return
        prices = self.prices
        missing = [m or "(no model)" for m in dict.fromkeys(models) if prices.price(m) is None]
        if missing:
            raise InvalidOptions(
                f"no price for {', '.join(missing)}: a budget needs a price for every model "
                '(add one under [prices."model-name"] in the config); nothing was recorded'
            )

    @property
    def prices(self) -> PriceTable:
        """The price table: the packaged Batch API prices with the config's `[prices]`."""
        if self._prices is None:
            self._prices = self.settings.price_table()
        return self._prices

    def _options(
        self,
        endpoint: str,
        completion_window: str | None,
        metadata: Mapping[str, str] | None,
        max_attempts: int | None,
        deadline: str | float | None,
        max_batch_requests: int | None,
        max_batch_bytes: int | None,
    ) -> dict[str, Any]:
        return self._job_options(
            endpoint,
            completion_window or self.settings.completion_window,
            metadata or {},
            max_attempts or self.settings.max_attempts,
            deadline,
            max_batch_requests,
            max_batch_bytes,
        )

    def _submit(
        self,
        source: Path,
        endpoint: str,
        options: dict[str, Any],
        *,
        name: str | None = None,
        allow_duplicate: bool = False,
        retry_of: str | None = None,
        max_cost: float | None = None,
    ) -> Job:
        if name is not None:
            _check_name(name)
        content = content_sha256(source)
        print_ = fingerprint(content, endpoint, options) if content is not None else None
        with self.store.read() as conn:
            self._refuse_duplicates(conn, print_, name, allow_duplicate)
        now = time.time()
        job_id = new_id("job")
        jobs_dir = self.data_dir / "jobs"
        staging = jobs_dir / f"{job_id}.staging"
        final = jobs_dir / job_id / "input"
        limits = _limits(options)
        try:
            # One transaction from the first shard to the commit: the request index is written
            # while the file is still being read (see `intake`), and a refused file leaves
            # nothing. On SQLite other writers wait meanwhile (readers do not).
            with self.store.write(bulk=True) as conn:
                job_number = self.store.next_job_number(conn)
                with RequestIndexLoader(self.store, conn, job_number) as loader:
                    prepared = inputs.prepare_input(
                        source, endpoint, staging, limits, on_shard=loader.add,
                        estimate_every=self._estimate_every(max_cost),
                    )  # fmt: skip
                # Again in the transaction that records the job: another submit of the same
                # file (or name) may have committed meanwhile.
                self._refuse_duplicates(conn, print_, name, allow_duplicate)
                self._check_priced((shard.model for shard in prepared.shards), max_cost)
                final.parent.mkdir(parents=True, exist_ok=True)
                shards = prepared.move_to(final).shards
                job = {
                    "id": job_id,
                    "number": job_number,
                    "status": JobStatus.QUEUED,
                    "endpoint": endpoint,
                    "completion_window": options["completion_window"],
                    "user_metadata": options["metadata"],
                    "max_attempts": options["max_attempts"],
                    "deadline_at": now + options["deadline"] if options["deadline"] else None,
                    "source": str(source.resolve()),
                    "input_dir": str(final),
                    "max_batch_requests": options["max_batch_requests"],
                    "max_batch_bytes": options["max_batch_bytes"],
                    "request_count": prepared.requests,
                    "bytes": prepared.bytes,
                    "name": name,
                    "fingerprint": print_,
                    "retry_of": retry_of,
                    "max_cost": max_cost,
                    "created_at": now,
                    "updated_at": now,
                }
                batches = [
                    {
                        "id": new_id("batch"),
                        "job_id": job_id,
                        "number": batch_number_for(shard),
                        "status": BatchStatus.QUEUED,
                        "shard_index": shard.index,
                        "attempt": 1,
                        "model": shard.model,
                        "input_path": str(shard.path),
                        "request_count": shard.requests,
                        "bytes": shard.bytes,
                        # What a budget, the enqueued-token limits and the queued events
                        # count with: the requests' input tokens and output bound, estimated
                        # (`jobqueue.tokens`) while the lines were validated.
                        "estimated_tokens": shard.estimated_tokens,
                        "max_output_tokens": shard.max_output_tokens,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for shard in shards
                ]
                self.store.insert_job(conn, job, batches, sampled=[s.sampled for s in shards])
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(final.parent, ignore_errors=True)
            if isinstance(exc, OSError):
                raise StorageError.of(exc, jobs_dir) from exc
            raise
        if self._daemon is not None:
            self._daemon.wake("submit")
        log.debug(
            "job submitted",
            job_id=job_id,
            requests=prepared.requests,
            batches=len(shards),
            bytes=prepared.bytes,
        )
        return self.get(job_id)

    def _estimate_every(self, max_cost: float | None) -> int:
        """Of how many requests submit estimates one (`inputs.prepare_input`): each under a
        budget or an enqueued-token limit, which count with the estimates; else a sample."""
        if max_cost is not None or self.settings.enqueued_token_limit is not None:
            return 1
        return SAMPLED_ESTIMATE_EVERY

    def _refuse_duplicates(
        self, conn: Any, print_: str | None, name: str | None, allow_duplicate: bool
    ) -> None:
        if name is not None:
            taken = lookup.job_by_name(conn, name)
            if taken is not None:
                raise InvalidOptions(f"the name {name!r} is taken by job {taken.id}")
        if print_ is None or allow_duplicate:
            return
        found = lookup.jobs_with_fingerprint(conn, print_, open_only=True)
        if found:
            raise DuplicateJob(self._with_short_ids(conn, [Job.from_row(found[0])])[0])

    def job_for_file(
        self,
        path: str | Path,
        endpoint: str,
        *,
        completion_window: str | None = None,
        metadata: Mapping[str, str] | None = None,
        max_attempts: int | None = None,
        deadline: str | float | None = None,
        max_batch_requests: int | None = None,
        max_batch_bytes: int | None = None,
    ) -> Job | None:
        """The newest job made from this file's content with these options (what `submit`
        with them would make), whether it is open or ended; None when there is none, or when
        its local files were purged. `jobqueue process` finds its job again this way."""
        options = self._options(
            endpoint, completion_window, metadata, max_attempts, deadline, max_batch_requests,
            max_batch_bytes,
        )  # fmt: skip
        content = content_sha256(Path(path))
        if content is None:
            return None
        with self.store.read() as conn:
            found = lookup.jobs_with_fingerprint(conn, fingerprint(content, endpoint, options))
        for row in found:
            if row.purged_at is None:
                return self.get(row.id)
        return None

    def plan(
        self,
        path: str | Path,
        endpoint: str,
        *,
        completion_window: str | None = None,
        metadata: Mapping[str, str] | None = None,
        max_attempts: int | None = None,
        deadline: str | float | None = None,
        max_batch_requests: int | None = None,
        max_batch_bytes: int | None = None,
        name: str | None = None,
        max_cost: float | None = None,
    ) -> SubmitPlan:
        """What `submit` would record, without recording anything (`submit --dry-run`): the
        file is validated and sharded in a temporary directory that is removed afterwards,
        and each shard's tokens are estimated (`jobqueue.tokens`: input tokens by a heuristic,
        output tokens by the requests' own bounds), and priced (`ShardPlan.cost_min`: the input
        alone; `cost_max`: with the most output tokens). Raises what `submit` would raise, but
        a model without a price under a budget: the plan lists it (`unpriced`)."""
        max_cost = self._max_cost(max_cost)
        options = self._options(
            endpoint, completion_window, metadata, max_attempts, deadline, max_batch_requests,
            max_batch_bytes,
        )  # fmt: skip
        if name is not None:
            _check_name(name)
            with self.store.read() as conn:
                self._refuse_duplicates(conn, None, name, True)
        source = Path(path)
        content = content_sha256(source)
        duplicate = None
        if content is not None:
            with self.store.read() as conn:
                found = lookup.jobs_with_fingerprint(
                    conn, fingerprint(content, endpoint, options), open_only=True
                )
            duplicate = found[0].id if found else None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".dry-run-", dir=self.data_dir))
        try:
            prepared = inputs.prepare_input(
                source, endpoint, scratch / "input", _limits(options), sync=False,
                estimate_every=1,
            )  # fmt: skip
            shards = tuple(_shard_plan(shard, self.prices) for shard in prepared.shards)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return SubmitPlan(
            str(source.resolve()), endpoint, options, shards, duplicate_of=duplicate,
            prices_date=self.prices.date, prices_source=self.prices.source, max_cost=max_cost,
        )  # fmt: skip

    def _job_options(
        self,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
        max_attempts: int,
        deadline: str | float | None,
        max_batch_requests: int | None,
        max_batch_bytes: int | None,
    ) -> dict[str, Any]:
        try:
            inputs.check_endpoint(endpoint)
        except ValueError as exc:
            raise InvalidOptions(str(exc)) from None
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidOptions(
                f"completion window {completion_window!r} is not accepted by the remote; "
                f"use {', '.join(COMPLETION_WINDOWS)}"
            )
        remote_max = _provider_class(self.settings.provider).max_requests_per_file
        requests_limit = max_batch_requests or remote_max
        if not 1 <= requests_limit <= remote_max:
            raise InvalidOptions(f"--max-batch-requests must be between 1 and {remote_max}")
        bytes_limit = max_batch_bytes or REMOTE_MAX_BYTES
        if not 1024 <= bytes_limit <= REMOTE_MAX_BYTES:
            raise InvalidOptions(f"--max-batch-bytes must be between 1024 and {REMOTE_MAX_BYTES}")
        if max_attempts < 1:
            raise InvalidOptions("--max-attempts must be at least 1")
        seconds = None
        if deadline is not None:
            try:
                seconds = parse_duration(deadline)
            except ValueError as exc:
                raise InvalidOptions(f"--deadline: {exc}") from None
        return {
            "completion_window": completion_window,
            "metadata": _check_metadata(metadata),
            "max_attempts": max_attempts,
            "deadline": seconds,
            "max_batch_requests": requests_limit,
            "max_batch_bytes": bytes_limit,
        }

    # -- queries ----------------------------------------------------------------------------

    def job_row(self, conn: Any, job_id: str) -> Any:
        """The job's row, by id, name or unambiguous prefix (of the id, or of its random part;
        with or without `job_`): `JobNotFound` when there is none, `AmbiguousJob` (listing
        them) when the prefix matches several."""
        found = lookup.find_jobs(conn, job_id, limit=11)
        if not found:
            raise JobNotFound(job_id)
        if len(found) > 1:
            matches = self._with_short_ids(conn, [Job.from_row(row) for row in found[:10]])
            raise AmbiguousJob(job_id, matches, more=len(found) > 10)
        return found[0]

    def get(self, job_id: str) -> Job:
        """A job with its batches, by id, name or unambiguous prefix (see `job_row`)."""
        with self.store.read() as conn:
            row = self.job_row(conn, job_id)
            job = Job.from_row(row, self.store.job_batches(conn, row.id), prices=self.prices)
            return self._with_short_ids(conn, [job])[0]

    def jobs(self, status: str | None = None, *, limit: int | None = None) -> list[Job]:
        """Jobs, newest first (without their batches). `status` is one of `JOB_STATUSES`."""
        if status is not None and status not in JOB_STATUSES:
            raise InvalidOptions(f"no job status {status!r}: use one of {', '.join(JOB_STATUSES)}")
        with self.store.read() as conn:
            rows = self.store.list_jobs(conn, status, limit)
            usage: dict[str, dict[str | None, Usage]] = {row.id: {} for row in rows}
            for found in costs.usage_by_job_and_model(conn, usage):
                usage[found.job_id][found.model] = found.usage
            firsts: dict[str, list[Any]] = {row.id: [] for row in rows}
            for batch in costs.first_attempt_estimates(conn, firsts):
                firsts[batch.job_id].append(batch)
            prices = self.prices
            jobs = [
                Job.from_row(
                    row,
                    prices=prices,
                    usage=usage[row.id],
                    estimate=submitted_estimate(prices, firsts[row.id]),
                )
                for row in rows
            ]
            return self._with_short_ids(conn, jobs)

    def short_ids(self, job_ids: Iterable[str]) -> dict[str, str]:
        """The short form of each id: the shortest prefix of its random part (at least six
        digits) that names no other job, the form `get` takes back."""
        with self.store.read() as conn:
            return lookup.short_ids(conn, job_ids)

    def _with_short_ids(self, conn: Any, jobs: list[Job]) -> list[Job]:
        from dataclasses import replace

        shorts = lookup.short_ids(conn, [job.id for job in jobs])
        return [replace(job, short_id=shorts.get(job.id)) for job in jobs]

    def daemons_alive(self) -> list[str]:
        """The ids of the daemons running on this database (this process's own, `start()`,
        included): those of the `daemons` table not stopped whose heartbeat is younger than
        `daemon_timeout`. Empty when none is."""
        since = time.time() - self.settings.daemon_timeout
        with self.store.read() as conn:
            seen = daemons_heard_since(conn, since)
        if self._daemon is not None and self._daemon.running and self._daemon.owner not in seen:
            seen.append(self._daemon.owner)
        return seen

    def events(
        self, job_id: str | None = None, *, after: int | None = None, limit: int | None = None
    ) -> list[Event]:
        """Outbox events in order, for one job or all: with `after`, those after that sequence
        number (the first `limit` of them: pages forward); without, the newest `limit`."""
        with self.store.read() as conn:
            if job_id is not None:
                job_id = self.job_row(conn, job_id).id
            rows = self.store.events(
                conn, job_id, after_seq=after, limit=limit, newest=after is None
            )
            return [Event.from_row(r) for r in rows]

    def retried_requests(self, job_id: str) -> int:
        """How many of the job's requests needed more than one attempt."""
        with self.store.read() as conn:
            return retried_request_count(conn, self.job_row(conn, job_id).id)

    # -- costs and budgets ------------------------------------------------------------------

    def set_budget(self, job_id: str, max_cost: float | None) -> Job:
        """Give a job a new budget in USD (None: none). A job the budget stopped goes on at
        once when the new one allows its next batch: its `budget` problem is cleared, and its
        queued batches are due now (a daemon, or `run`, submits them). Every model of the job
        needs a price under a budget (`InvalidOptions` otherwise)."""
        value = None if max_cost is None else self._max_cost(max_cost)
        from jobqueue.core.problems import ProblemSource
        from jobqueue.store.problems import clear_problem

        # A job submitted without a budget has estimates from a sample of its requests (or,
        # queued by an older jobqueue, the rough bytes / 4): a budget counts with every
        # request's, so its queued batches are estimated again, each request of them.
        with self.store.read() as conn:
            row = self.job_row(conn, job_id)
            queued = (
                [b for b in self.store.job_batches(conn, row.id) if b.status == "queued"]
                if row.max_cost is None
                else []
            )
        estimates = {}
        if value is not None:
            try:
                estimates = {b.id: _estimate_file(row.endpoint, b.input_path) for b in queued}
            except OSError as exc:
                raise StorageError.of(exc, Path(row.input_dir)) from exc
        with self.store.write() as conn:
            row = self.job_row(conn, job_id)
            if row.status not in OPEN_STATUSES:
                raise InvalidOptions(f"job {row.id} has ended ({row.status}): its budget is moot")
            models = [b.model for b in self.store.job_batches(conn, row.id)]
            self._check_priced(models, value)
            now = time.time()
            costs.set_budget(conn, row.id, value, now=now)
            costs.set_estimates(conn, estimates)
            clear_problem(conn, row.id, ProblemSource.BUDGET, now=now)
        if self._daemon is not None:
            self._daemon.wake("submit")
        log.info("job budget set", job_id=row.id, max_cost=value)
        return self.get(row.id)

    def cost_report(
        self,
        job_ids: Sequence[str] | None = None,
        *,
        since: float | None = None,
        by: str = "model",
        key: str | None = None,
    ) -> CostReport:
        """What jobs cost: their collected usage priced, summed `by` "model", "job" or
        "metadata" (the value of metadata key `key`), over `job_ids` (ids, names or prefixes)
        or every job, those created at or after `since` (Unix seconds) when given. A group
        with a model without a price has an unknown cost (None), never 0."""
        if by not in COST_GROUPS:
            raise InvalidOptions(f"--by must be one of {', '.join(COST_GROUPS)}, not {by!r}")
        if (by == "metadata") != (key is not None):
            raise InvalidOptions("--by metadata needs a KEY (`--by metadata team`), and only it")
        prices = self.prices
        with self.store.read() as conn:
            wanted = None if job_ids is None else [self.job_row(conn, r).id for r in job_ids]
            jobs = {row.id: row for row in costs.jobs_for_costs(conn, wanted, since)}
            found = costs.usage_by_job_and_model(conn, jobs)
        groups: dict[str | None, dict[str, Any]] = {}
        unpriced: dict[str, None] = {}
        for item in found:
            job = jobs[item.job_id]
            if by == "model":
                group = item.model
            elif by == "job":
                group = item.job_id
            else:
                value = (job.user_metadata or {}).get(key)
                group = None if value is None else str(value)
            cost = prices.cost(item.model, item.usage)
            if cost is None:
                unpriced[item.model or "(no model)"] = None
            line = groups.setdefault(
                group, {"jobs": {}, "batches": 0, "usage": Usage(), "costs": [], "name": None}
            )
            line["jobs"][item.job_id] = None
            line["batches"] += item.batches
            line["usage"] += item.usage
            line["costs"].append(cost)
            if by == "job":
                line["name"] = job.name
        lines = tuple(
            CostLine(
                group, len(line["jobs"]), line["batches"], line["usage"],
                sum_costs(line["costs"]), name=line["name"],
            )
            for group, line in groups.items()
        )  # fmt: skip
        when = datetime.fromtimestamp(since, UTC) if since is not None else None
        counted = len({item.job_id for item in found})
        return CostReport(by, key, when, lines, tuple(unpriced), jobs=counted)

    # -- hook deliveries --------------------------------------------------------------------

    def deliveries(self, seqs: Iterable[int]) -> dict[int, list[Delivery]]:
        """The hook deliveries of the events with these sequence numbers, by event seq."""
        wanted = list(seqs)
        if not wanted:
            return {}
        with self.store.read() as conn:
            return outbox.deliveries_by_seq(conn, wanted)

    def dead_deliveries(
        self, job_id: str | None = None, *, limit: int | None = None
    ) -> list[Delivery]:
        """Dead-lettered hook deliveries (every attempt failed), of one job or all."""
        with self.store.read() as conn:
            if job_id is not None:
                job_id = self.job_row(conn, job_id).id
            return outbox.dead_deliveries(conn, job_id, limit=limit)

    def redeliver(self, event_id: str, sink: str | None = None) -> int:
        """Queue an event's dead or delivered hook deliveries again (only to `sink`, if given);
        return how many. Pending ones are left alone: they are still being tried."""
        with self.store.write() as conn:
            if outbox.find_event(conn, event_id) is None:
                raise EventNotFound(event_id)
            return outbox.redeliver(conn, event_id, sink, time.time())

    # -- the database schema ----------------------------------------------------------------

    def upgrade_database(self) -> str | None:
        """Bring the schema up to date; return the revision it is at."""
        from jobqueue.store.migrate import current_revision, upgrade

        upgrade(self.store)
        return current_revision(self.store)

    @staticmethod
    def schema_revisions(
        config: str | Path | None = None, **overrides: Any
    ) -> tuple[str | None, str | None]:
        """(the database's schema revision, the code's), without upgrading the database: the
        database and settings are those `JobQueue(config=config, **overrides)` would open."""
        from jobqueue.store.migrate import current_revision, head_revision

        settings = load_settings(config, **overrides)
        store = Store(settings.effective_database_url, migrate=False)
        try:
            return current_revision(store), head_revision()
        finally:
            store.close()

    # -- running the duties -----------------------------------------------------------------

    def start(self, *, provider: Provider | None = None) -> None:
        """Run the daemon's duties in background threads of this process.

        On SQLite, `DaemonAlreadyRunning` when another daemon (another process, or another
        `JobQueue` here) already runs on the same database file."""
        if self._daemon is not None:
            return
        from jobqueue.service.daemon import Daemon

        daemon = Daemon(self.settings, self.store, provider, sinks=self._python_sinks)
        try:
            daemon.start()  # on SQLite, DaemonAlreadyRunning when another daemon has the file
        except BaseException:
            daemon.stop()
            raise
        self._daemon = daemon

    def on(
        self,
        patterns: str | list[str],
        fn: Callable[[dict[str, Any]], object] | None = None,
        *,
        name: str | None = None,
        max_attempts: int = 8,
    ) -> Any:
        """Call `fn(event)` for every event whose type matches (`*`, `job.*`, `batch.completed`,
        or a list), at least once and in order per job, from the running duties' threads.

        Use as `jq.on("job.*", fn)` or as a decorator `@jq.on("job.completed")`. An exception
        is a failed delivery, retried with backoff up to `max_attempts`. Only events committed
        after the first registration of a callable are delivered to it.
        """
        from jobqueue.hooks.sinks import PythonSink

        def register(target: Callable[[dict[str, Any]], object]) -> Callable[..., object]:
            sink = PythonSink(target, patterns, name, max_attempts=max_attempts)
            # Its cursor starts now: every event committed from here on reaches it, even
            # before `start()`, and a restarted process resumes where it left off.
            with self.store.write() as conn:
                outbox.ensure_cursors(conn, self.store.dialect, {sink.name: False}, time.time())
            self._python_sinks = [s for s in self._python_sinks if s.name != sink.name] + [sink]
            if self._daemon is not None:
                self._daemon.set_extra_sinks(self._python_sinks)
            return target

        return register(fn) if fn is not None else register

    def stop(self) -> None:
        """Stop the background duties: steps in hand finish, leases are released."""
        daemon, self._daemon = self._daemon, None
        if daemon is not None:
            daemon.stop()

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        provider: Provider | None = None,
        listen: str | None = None,
    ) -> None:
        """Run the duties in the foreground until `stop` is set (or KeyboardInterrupt); with
        `listen` (HOST:PORT), serve OpenAI webhooks, /healthz and /metrics there meanwhile.

        A bad or busy address, a missing API key or a hook that cannot run is refused with a
        `ConfigError` (one line) before any work starts; on SQLite, another daemon running on
        the database file with `DaemonAlreadyRunning`, before anything listens."""
        daemon = self._new_daemon(provider)
        sock = None
        try:
            daemon.hold_database()
            if listen:
                from jobqueue.service.server import listen_socket

                sock = listen_socket(listen)
        except BaseException:
            daemon.stop()
            raise
        server = None
        if sock is not None:
            from jobqueue.service.server import serve_in_background

            try:
                server = serve_in_background(daemon, sock)
            except BaseException:
                sock.close()
                daemon.stop()
                raise
        try:
            daemon.run_forever(stop or threading.Event())
        except KeyboardInterrupt:
            daemon.stop()
        finally:
            if server is not None:
                server.stop()

    def run_once(self, *, provider: Provider | None = None) -> RunReport:
        """Run the duties in this thread until a whole round moves nothing (hook deliveries due
        now included). The report holds the steps taken, the duties that failed, and the jobs
        still open (with their problems). With several daemons on PostgreSQL it runs the
        leader's duties (reconcile, expire) only if no other daemon leads; on SQLite,
        `DaemonAlreadyRunning` when a daemon runs on the database file."""
        daemon = self._new_daemon(provider)
        with self.store.write() as conn:
            retry_held_now(conn)  # the operator may have fixed it: try at once, see again
        try:
            steps = daemon.run_once()
        finally:
            daemon.stop()
        return RunReport(
            steps=steps, failed_duties=daemon.failed_duties(), still_open=tuple(self._open_jobs())
        )

    def run_until_done(
        self,
        job_ids: Sequence[str] | None = None,
        *,
        provider: Provider | None = None,
        stop: threading.Event | None = None,
        poll: float = 1.0,
        on_poll: Callable[[list[Job]], object] | None = None,
        stop_on_operator: bool = True,
    ) -> RunReport:
        """Run the duties (in background threads of this process) until no job is open: every
        job of the database, or only `job_ids`. Stops early when `stop` is set, or, with
        `stop_on_operator`, when every open job waits on a problem only the operator can fix
        (a refused key, a used-up quota): it would wait for ever. `on_poll(open_jobs)` is called
        every `poll` seconds. The report lists the jobs that ended, those still open, and the
        duties that failed meanwhile."""
        wanted = None
        if job_ids is not None:
            with self.store.read() as conn:
                wanted = [self.job_row(conn, ref).id for ref in job_ids]
        stop = stop or threading.Event()
        seen: dict[str, None] = {}
        daemon = self._new_daemon(provider)
        with self.store.write() as conn:
            retry_held_now(conn, wanted)  # the operator may have fixed it: try at once
        daemon.start()
        try:
            while True:
                open_jobs = self._open_jobs(wanted)
                seen.update(dict.fromkeys(job.id for job in open_jobs))
                if on_poll is not None:
                    on_poll(open_jobs)
                if not open_jobs:
                    break
                # Held up for good: a problem only the operator can fix, seen in this run (one
                # left from an earlier run may be fixed by now; it is tried first).
                confirmed = daemon.stats.get("problems_seen", {})
                if stop_on_operator and all(
                    job.needs_operator and job.id in confirmed for job in open_jobs
                ):
                    break
                if stop.wait(poll):
                    break
        finally:
            daemon.stop()
        ids = list(dict.fromkeys([*(wanted or []), *seen]))
        with self.store.read() as conn:
            rows = [row for job_id in ids if (row := self.store.get_job(conn, job_id))]
            jobs = self._with_short_ids(conn, [Job.from_row(row) for row in rows])
        return RunReport(
            failed_duties=daemon.failed_duties(),
            ended=tuple(job for job in jobs if job.done),
            still_open=tuple(job for job in jobs if not job.done),
        )

    def _open_jobs(self, job_ids: Sequence[str] | None = None) -> list[Job]:
        with self.store.read() as conn:
            jobs = [Job.from_row(row) for row in lookup.open_jobs(conn, job_ids)]
            return self._with_short_ids(conn, jobs)

    def _new_daemon(self, provider: Provider | None) -> Daemon:
        from jobqueue.service.daemon import Daemon
        from jobqueue.settings import ConfigError

        try:
            return Daemon(self.settings, self.store, provider, sinks=self._python_sinks)
        except ConfigError:
            raise
        except ValueError as exc:  # e.g. no API key, or a hook command that cannot run
            raise ConfigError(str(exc)) from None

    @property
    def daemon(self) -> Daemon | None:
        return self._daemon

    def wait(self, job_id: str, timeout: float | None = None, *, poll: float = 0.2) -> Job:
        """Block until the job ends; return it. Raises TimeoutError when `timeout` runs out.

        Something must run the duties meanwhile: `start()` in this process, or a daemon.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job.id} still {job.status} after {timeout}s")
            time.sleep(
                poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
            )

    # -- results ----------------------------------------------------------------------------

    def results(
        self, job_id: str, *, errors_only: bool = False, partial: bool = False
    ) -> Iterator[dict[str, Any]]:
        """One record per request, in input order, in the batch output line shape
        (`custom_id`, `response`, `error`): the latest attempt's outcome. Requests that never
        ran carry the `batch_cancelled` or `batch_expired` error. `partial`: only the requests
        that have their final outcome already (the results so far of a running job)."""
        for line in self._result_lines(job_id, errors_only=errors_only, partial=partial):
            yield orjson.loads(line)

    def export_results(
        self, job_id: str, out: IO[bytes], *, errors_only: bool = False, partial: bool = False
    ) -> int:
        """Write the results as JSONL in input order to a binary stream; return lines written.
        `partial`: as for `results`."""
        number, paths = self._result_paths(job_id)
        return write_result_lines(
            self.store, number, paths, out, errors_only=errors_only, final_only=partial
        )

    def _result_lines(self, job_id: str, *, errors_only: bool, partial: bool) -> Iterator[bytes]:
        number, paths = self._result_paths(job_id)
        for _row, line in iter_result_lines(
            self.store, number, paths, errors_only=errors_only, final_only=partial
        ):
            yield line

    def _result_paths(self, job_id: str) -> tuple[int, dict[int, dict[str, str]]]:
        """The job's number and, by batch number, the result files the export reads."""
        with self.store.read() as conn:
            row = self.job_row(conn, job_id)
            batches = self.store.job_batches(conn, row.id)
        if row.purged_at is not None:
            purged = datetime.fromtimestamp(row.purged_at, UTC)
            raise JobQueueError(
                f"the results of job {row.id} were deleted on {purged:%Y-%m-%d} "
                f"(result_retention is {self.settings.result_retention:g}s)"
            )
        return row.number, {
            b.number: {
                k: v
                for k, v in (("output", b.output_path), ("error", b.error_path))
                if v is not None
            }
            for b in batches
        }

    # -- control ----------------------------------------------------------------------------

    def retry(self, job_id: str, *, codes: Sequence[str] = (), name: str | None = None) -> Job:
        """A new attempt at an ended job's failed requests: a new job, linked to the old one
        (`retry_of`), holding their lines in input order, with the old job's options (its
        deadline as a duration from now). `codes` keeps only requests whose error code
        (`batch_expired`, `server_error`, …) or HTTP status (`500`) is one of them. The old
        job and its results stay as they are; the new job's results are the retried requests'.
        Raises `InvalidOptions` when the job is still open, its files were purged, or nothing
        failed (with those codes); `DuplicateJob` when a retry of the same requests is open."""
        with self.store.read() as conn:
            row = self.job_row(conn, job_id)
        if row.status in OPEN_STATUSES:
            raise InvalidOptions(
                f"job {row.id} is still {row.status}: retry its failed requests once it ends"
            )
        if row.purged_at is not None:
            raise InvalidOptions(f"the files of job {row.id} were deleted: nothing to retry from")
        lines = self._failed_lines(row, list(codes))
        if not lines:
            which = f" with code {', '.join(codes)}" if codes else ""
            raise InvalidOptions(f"job {row.id} has no failed requests{which} to retry")
        retries = Path(row.input_dir).parent / "retries"
        retries.mkdir(parents=True, exist_ok=True)
        source = retries / f"retry-{new_id('r')[2:]}.jsonl"
        with source.open("wb") as f:
            for _position, line in sorted(lines.items()):
                f.write(line if line.endswith(b"\n") else line + b"\n")
        deadline = (
            max(1.0, row.deadline_at - row.created_at) if row.deadline_at is not None else None
        )
        options = self._options(
            row.endpoint, row.completion_window, dict(row.user_metadata or {}),
            row.max_attempts, deadline, row.max_batch_requests, row.max_batch_bytes,
        )  # fmt: skip
        try:
            job = self._submit(
                source, row.endpoint, options, name=name, retry_of=row.id,
                max_cost=self._max_cost(None),
            )  # fmt: skip
        except BaseException:
            source.unlink(missing_ok=True)
            raise
        log.info("retry job submitted", job_id=job.id, retry_of=row.id, requests=len(lines))
        return job

    def _failed_lines(self, row: Any, codes: list[str]) -> dict[int, bytes]:
        """position -> input line, of the job's failed requests (with `codes`), read from the
        shards that hold their latest attempt."""
        wanted: dict[str, dict[str, int]] = {}
        for page in failed_requests(self.store, row.id, row.number, codes):
            for request in page:
                wanted.setdefault(request.input_path, {})[request.custom_id] = request.position
        lines: dict[int, bytes] = {}
        for path, positions in wanted.items():
            try:
                with open(path, "rb") as f:
                    for line in f:
                        if not line.strip():
                            continue
                        position = positions.get(orjson.loads(line).get("custom_id"))
                        if position is not None and position not in lines:
                            lines[position] = line
            except OSError as exc:
                raise JobQueueError(f"cannot read the shard {path}: {exc.strerror}") from None
        return lines

    def cancel(self, job_id: str, *, provider: Provider | None = None) -> Job:
        """Cancel a job: queued batches end at once; submitted ones are cancelled remotely now
        when the remote answers, else by the daemon's next cycle. Finished requests are kept."""
        remote = 0
        with self.store.write() as conn:
            row = self.job_row(conn, job_id)
            if row.status in (JobStatus.QUEUED, JobStatus.RUNNING):
                remote = request_cancel(self.store, conn, row.id)
                log.debug("job cancel requested", job_id=row.id, remote_batches=remote)
        if remote:
            if self._daemon is not None:
                self._daemon.wake("reconcile")
            else:
                self._cancel_remotely(provider)
        return self.get(row.id)

    def _cancel_remotely(self, provider: Provider | None) -> None:
        """Send the requested cancels at once rather than leave them to a daemon's next cycle.
        Best effort: whatever fails here, the daemon sends later."""
        from jobqueue.duties.context import DutyContext
        from jobqueue.duties.reconcile import send_cancels
        from jobqueue.remote import make_provider

        try:
            remote = provider or make_provider(self.settings)
        except ValueError as exc:  # e.g. no key here: the daemon has one
            log.info("remote cancel left to the daemon", reason=str(exc))
            return
        try:
            send_cancels(DutyContext(store=self.store, provider=remote, settings=self.settings))
        except Exception as exc:
            log.warning("remote cancel failed; the daemon will retry", error=str(exc))
        finally:
            if provider is None:
                remote.close()


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidOptions(
            f"job name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    if looks_like_id(name):
        raise InvalidOptions(
            f"job name {name!r} looks like a job id (hex digits, or `job_`): pick another"
        )


def _limits(options: Mapping[str, Any]) -> inputs.Limits:
    return inputs.Limits(
        max_requests=options["max_batch_requests"],
        max_bytes=options["max_batch_bytes"],
        max_embedding_inputs=min(options["max_batch_requests"], 50_000),
    )


def _shard_plan(shard: inputs.Shard, prices: PriceTable | None = None) -> ShardPlan:
    """A shard's size and token estimate (`jobqueue.tokens`, made while it was validated), and
    with `prices` its estimated cost."""
    input_tokens, output = shard.estimated_tokens, shard.max_output_tokens
    cost = prices.estimate(shard.model, input_tokens, output) if prices is not None else None
    return ShardPlan(
        shard.index, shard.model, shard.requests, shard.bytes, input_tokens, output,
        cost_min=cost.low if cost is not None else None,
        cost_max=cost.high if cost is not None else None,
    )  # fmt: skip


def _estimate_file(endpoint: str, path: str | Path) -> tuple[int, int | None]:
    """The estimated input tokens of a shard's requests, and the most output tokens they
    allow (None when one sets no bound)."""
    input_tokens = 0
    output: int | None = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            guess = tokens.estimate(endpoint, orjson.loads(line).get("body"))
            input_tokens += guess.input_tokens
            if output is not None:
                output = (
                    None if guess.max_output_tokens is None else output + guess.max_output_tokens
                )
    return input_tokens, output


def _provider_class(name: str) -> Any:
    from jobqueue.remote.azure import AzureOpenAIProvider
    from jobqueue.remote.openai import OpenAIProvider

    return AzureOpenAIProvider if name == "azure" else OpenAIProvider


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_USER_METADATA:
        raise InvalidOptions(
            f"at most {MAX_USER_METADATA} metadata pairs (the remote allows 16; jobqueue uses 2)"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 64:
            raise InvalidOptions(f"metadata key {key!r} must be a string of 1 to 64 characters")
        if key.startswith(RESERVED_METADATA_PREFIX):
            raise InvalidOptions(f"metadata key {key!r}: the prefix 'jobqueue_' is reserved")
        if not isinstance(value, str) or len(value) > 512:
            raise InvalidOptions(
                f"metadata value of {key!r} must be a string of at most 512 characters"
            )
    return dict(metadata)
