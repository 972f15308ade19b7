"""The embedded API: `JobQueue`, the same core the CLI and the daemon use.

from jobqueue import JobQueue
jq = JobQueue()                      # defaults from the config file and the environment
job = jq.submit("requests.jsonl", endpoint="/v1/chat/completions")
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from jobqueue.core.durations import parse_duration
from jobqueue.core.ids import new_id
from jobqueue.core.records import Delivery, Event, Job
from jobqueue.files import inputs
from jobqueue.files.sharing import share_with_group
from jobqueue.logs import get_logger
from jobqueue.settings import Settings, load_settings
from jobqueue.store import Store, outbox
from jobqueue.store import StoreError as StoreError  # re-exported: the CLI catches it
from jobqueue.store.intake import RequestIndexLoader, batch_number_for
from jobqueue.store.lifecycle import request_cancel
from jobqueue.store.metrics import retried_request_count
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
RESERVED_METADATA_PREFIX = "jobqueue_"


class JobQueueError(Exception):
    """An error to show the user as one line; `exit_code` is what the CLI exits with."""

    exit_code = 1


class JobNotFound(JobQueueError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")


class EventNotFound(JobQueueError):
    def __init__(self, event_id: str) -> None:
        super().__init__(f"no event {event_id!r}")


class InvalidOptions(JobQueueError):
    exit_code = 2


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
        self.data_dir = Path(self.settings.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        share_with_group(self.data_dir)  # a setgid data dir: files group-writable, see there
        self.store = Store(self.settings.effective_database_url)
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
    ) -> Job:
        """Validate and shard a JSONL file, record the job and its batches as `queued`.

        Streams the file once. A bad file raises `inputs.InputError` naming every problem with
        its line, and nothing is recorded: no job row, no shard file.
        """
        source = Path(path)
        options = self._job_options(
            endpoint,
            completion_window or self.settings.completion_window,
            metadata or {},
            max_attempts or self.settings.max_attempts,
            deadline,
            max_batch_requests,
            max_batch_bytes,
        )
        now = time.time()
        job_id = new_id("job")
        jobs_dir = self.data_dir / "jobs"
        staging = jobs_dir / f"{job_id}.staging"
        final = jobs_dir / job_id / "input"
        limits = inputs.Limits(
            max_requests=options["max_batch_requests"],
            max_bytes=options["max_batch_bytes"],
            max_embedding_inputs=min(options["max_batch_requests"], 50_000),
        )
        try:
            # One transaction from the first shard to the commit: the request index is written
            # while the file is still being read (see `intake`), and a refused file leaves
            # nothing. On SQLite other writers wait meanwhile (readers do not).
            with self.store.write() as conn:
                job_number = self.store.next_job_number(conn)
                with RequestIndexLoader(self.store, conn, job_number) as loader:
                    prepared = inputs.prepare_input(
                        source, endpoint, staging, limits, on_shard=loader.add
                    )
                final.parent.mkdir(parents=True, exist_ok=True)
                shards = prepared.move_to(final).shards
                job = {
                    "id": job_id,
                    "number": job_number,
                    "status": "queued",
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
                    "created_at": now,
                    "updated_at": now,
                }
                batches = [
                    {
                        "id": new_id("batch"),
                        "job_id": job_id,
                        "number": batch_number_for(shard),
                        "status": "queued",
                        "shard_index": shard.index,
                        "attempt": 1,
                        "model": shard.model,
                        "input_path": str(shard.path),
                        "request_count": shard.requests,
                        "bytes": shard.bytes,
                        "estimated_tokens": shard.estimated_tokens,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for shard in shards
                ]
                self.store.insert_job(conn, job, batches)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(final.parent, ignore_errors=True)
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
        """The job's row, by id or unambiguous prefix; `JobNotFound` when there is none."""
        row = self.store.find_job(conn, job_id)
        if row is None:
            raise JobNotFound(job_id)
        return row

    def get(self, job_id: str) -> Job:
        """A job with its batches. Accepts an unambiguous prefix of the id."""
        with self.store.read() as conn:
            row = self.job_row(conn, job_id)
            return Job.from_row(row, self.store.job_batches(conn, row.id))

    def jobs(self, status: str | None = None, *, limit: int | None = None) -> list[Job]:
        """Jobs, newest first (without their batches)."""
        with self.store.read() as conn:
            return [Job.from_row(row) for row in self.store.list_jobs(conn, status, limit)]

    def events(
        self, job_id: str | None = None, *, after: int | None = None, limit: int | None = None
    ) -> list[Event]:
        """Outbox events in order, for one job or all."""
        with self.store.read() as conn:
            if job_id is not None:
                job_id = self.job_row(conn, job_id).id
            return [
                Event.from_row(r)
                for r in self.store.events(conn, job_id, after_seq=after, limit=limit)
            ]

    def retried_requests(self, job_id: str) -> int:
        """How many of the job's requests needed more than one attempt."""
        with self.store.read() as conn:
            return retried_request_count(conn, self.job_row(conn, job_id).id)

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
        """Run the daemon's duties in background threads of this process."""
        if self._daemon is not None:
            return
        from jobqueue.service.daemon import Daemon

        self._daemon = Daemon(self.settings, self.store, provider, sinks=self._python_sinks)
        self._daemon.start()

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
        `listen` (HOST:PORT), serve OpenAI webhooks, /healthz and /metrics there meanwhile."""
        from jobqueue.service.daemon import Daemon

        daemon = Daemon(self.settings, self.store, provider, sinks=self._python_sinks)
        server = None
        if listen:
            from jobqueue.service.server import serve_in_background

            server = serve_in_background(daemon, listen)
        try:
            daemon.run_forever(stop or threading.Event())
        except KeyboardInterrupt:
            daemon.stop()
        finally:
            if server is not None:
                server.stop()

    def run_once(self, *, provider: Provider | None = None) -> int:
        """Run the duties in this thread until a whole round moves nothing (hook deliveries due
        now included); return how many steps were taken."""
        from jobqueue.service.daemon import Daemon

        daemon = Daemon(self.settings, self.store, provider, sinks=self._python_sinks)
        try:
            return daemon.run_once()
        finally:
            daemon.stop()

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

    def results(self, job_id: str, *, errors_only: bool = False) -> Iterator[dict[str, Any]]:
        """One record per request, in input order, in the batch output line shape
        (`custom_id`, `response`, `error`): the latest attempt's outcome. Requests that never
        ran carry the `batch_cancelled` or `batch_expired` error."""
        for line in self._result_lines(job_id, errors_only=errors_only):
            yield orjson.loads(line)

    def export_results(self, job_id: str, out: IO[bytes], *, errors_only: bool = False) -> int:
        """Write the results as JSONL in input order to a binary stream; return lines written."""
        number, paths = self._result_paths(job_id)
        return write_result_lines(self.store, number, paths, out, errors_only=errors_only)

    def _result_lines(self, job_id: str, *, errors_only: bool) -> Iterator[bytes]:
        number, paths = self._result_paths(job_id)
        for _row, line in iter_result_lines(self.store, number, paths, errors_only=errors_only):
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

    def cancel(self, job_id: str, *, provider: Provider | None = None) -> Job:
        """Cancel a job: queued batches end at once; submitted ones are cancelled remotely now
        when the remote answers, else by the daemon's next cycle. Finished requests are kept."""
        remote = 0
        with self.store.write() as conn:
            row = self.job_row(conn, job_id)
            if row.status in ("queued", "running"):
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
