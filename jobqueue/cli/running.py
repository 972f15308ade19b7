"""The commands that run or follow the duties: `run`, `wait`, `results`, `process`, `demo`.

Registered on the main app by `jobqueue.cli.app`; kept apart so the daemon's imports (APScheduler,
the remote client) load only for the commands that need them.

Exit codes of `run --once`, `run --until-done`, `wait` and `process`: 0 every job completed, 1
one ended otherwise (failed, cancelled, expired), 3 `wait --timeout` ran out, 4 trouble (a duty
failed, or a job waits on a problem only the operator can fix: a refused key, a quota), 130
interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from jobqueue.cli.options import (
    AttemptsOption,
    BatchBytesOption,
    BatchRequestsOption,
    DeadlineOption,
    EndpointOption,
    FileArgument,
    JobArgument,
    MaxCostOption,
    MetadataOption,
    NameOption,
    WindowOption,
    job_label,
    submit_options,
)

# Registering the commands loads neither the API nor the daemon's modules (`jobqueue --help`);
# each command imports them when it runs. These types are for the annotations, which typer does
# not read: the commands' own parameters name none of them.
if TYPE_CHECKING:
    from jobqueue.api import JobQueue
    from jobqueue.core.records import Job, RunReport

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_COMPLETED = 0
EXIT_NOT_COMPLETED = 1
EXIT_TIMEOUT = 3
EXIT_TROUBLE = 4
EXIT_INTERRUPTED = 130
# How often `wait` looks for a running daemon (a heartbeat in the database).
DAEMON_CHECK_SECONDS = 10.0
NO_DAEMON = (
    "no daemon is running on this database (none has a fresh heartbeat): start one "
    "(`jobqueue run`, or the service), or run the job from here with `jobqueue run --until-done`"
)


class JobProgress:
    """What `wait` and `process` show of a job on a terminal: two bars, the remote's progress
    (what its batches report done) and the collected outcomes (what `results` has), and
    notes above them (a problem, no daemon). Routine log lines of this process are held back
    meanwhile and warnings are printed above the bars, so the terminal shows nothing but the
    bars; off a terminal (or `show=False`) notes are plain lines on stderr."""

    def __init__(self, console: Console, show: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self.show = show
        self.progress = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not show,
            transient=False,
            redirect_stderr=True,
        )
        self._stack = ExitStack()
        self._problem: str | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> JobProgress:
        if self.show:
            from jobqueue.logs import hushed

            self._stack.enter_context(hushed())
        self._stack.enter_context(self.progress)
        for name in ("remote", "collected"):
            self._tasks[name] = self.progress.add_task(name, total=None, detail="")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def update(self, job: Job) -> None:
        total = job.request_counts.total
        remote, collected = job.remote_counts, job.request_counts
        self.progress.update(
            self._tasks["remote"], total=total, completed=remote.done, detail=_describe(job)
        )
        self.progress.update(
            self._tasks["collected"],
            total=total,
            completed=collected.done,
            detail=f"{collected.completed:,} succeeded, {collected.failed:,} failed",
        )
        problem = job.problem if not job.done else None
        if problem != self._problem:
            if problem is not None:
                self.note(f"problem: {problem}", style="yellow")
            elif self._problem is not None:
                self.note("problem cleared")
            self._problem = problem

    def note(self, text: str, style: str | None = None) -> None:
        console = self.progress.console if self.show else self.console
        console.print(Text(text, style=style or ""))


def register(app: typer.Typer, queue_of: Any, print_json: Any) -> None:
    """Add the commands to `app`; `queue_of(ctx)` gives the JobQueue of a command."""

    @app.command()
    def run(
        ctx: typer.Context,
        once: Annotated[
            bool,
            typer.Option("--once", help="Run the duties until nothing moves, then exit."),
        ] = False,
        until_done: Annotated[
            bool,
            typer.Option(
                "--until-done",
                help="Run until no job is open, then exit with how they ended (0 all completed).",
            ),
        ] = False,
        listen: Annotated[
            str | None,
            typer.Option(
                "--listen",
                help="Serve webhooks, /healthz and /metrics on HOST:PORT (or JOBQUEUE_LISTEN).",
                show_default=False,
            ),
        ] = None,
    ) -> None:
        """Run the daemon in the foreground: submit, reconcile, collect, retry, expire.

        SIGTERM or SIGINT stops it cleanly: steps in hand finish, leases are released. On SQLite
        a second daemon (or `--once` while one runs) is refused with exit 2. With --once or
        --until-done the exit code says how it went: 0 fine, 1 a job ended other than
        completed, 4 a duty failed or a job waits on a problem only you can fix.
        """
        if once and until_done:
            raise typer.BadParameter("give --once or --until-done, not both", param_hint="--once")
        if listen is not None and (once or until_done):
            raise typer.BadParameter(
                "--listen serves the long-running daemon, not --once or --until-done",
                param_hint="--listen",
            )
        queue: JobQueue = queue_of(ctx)
        if once:
            report = queue.run_once()
            stderr.print(f"nothing more to do now ({report.steps} steps taken)")
            raise typer.Exit(_report(report, EXIT_COMPLETED))
        stop = threading.Event()
        if until_done:
            with _stop_on_signals(stop):
                report = queue.run_until_done(stop=stop)
            if stop.is_set() and report.still_open:
                stderr.print(f"stopped with {len(report.still_open)} job(s) still open")
                raise typer.Exit(EXIT_INTERRUPTED)
            for job in report.ended:
                stderr.print(f"job {job_label(job)} {job.status}: {_summary(job)}", markup=False)
            code = EXIT_COMPLETED if report.all_completed else EXIT_NOT_COMPLETED
            raise typer.Exit(_report(report, code))
        with _stop_on_signals(stop):
            queue.run(stop, listen=listen or queue.settings.listen)

    @app.command()
    def wait(
        ctx: typer.Context,
        job_id: JobArgument,
        timeout: Annotated[
            float | None, typer.Option("--timeout", help="Give up after this many seconds.")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
    ) -> None:
        """Wait for a job to end, with its progress on stderr: what the remote reports done, and
        the outcomes collected so far.

        Says so when the job has a problem, and when no daemon is seen running. Exit 0 when it
        completed, 1 when it ended otherwise (failed, cancelled, expired), 3 on timeout.
        """
        queue: JobQueue = queue_of(ctx)
        job = queue.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        show = stderr.is_terminal and not as_json
        with JobProgress(stderr, show) as bar:
            bar.update(job)
            next_check = time.monotonic()
            warned = False
            while not job.done:
                if not warned and time.monotonic() >= next_check:
                    if not queue.daemons_alive():
                        bar.note(NO_DAEMON, style="yellow")
                        warned = True
                    next_check = time.monotonic() + DAEMON_CHECK_SECONDS
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
                job = queue.get(job.id)
                bar.update(job)
        if as_json:
            print_json(job.to_dict())
        else:
            stderr.print(f"{job.id} {job.status}: {_summary(job)}", markup=False)
        if not job.done:
            raise typer.Exit(EXIT_TIMEOUT)
        from jobqueue.core.states import JobStatus

        raise typer.Exit(
            EXIT_COMPLETED if job.status == JobStatus.COMPLETED else EXIT_NOT_COMPLETED
        )

    @app.command()
    def results(
        ctx: typer.Context,
        job_id: JobArgument,
        output: Annotated[
            Path | None,
            typer.Option("--output", "-o", help="Write here (atomically) instead of stdout."),
        ] = None,
        errors_only: Annotated[
            bool, typer.Option("--errors-only", help="Only requests that did not succeed.")
        ] = False,
        partial: Annotated[
            bool,
            typer.Option(
                "--partial",
                help="While the job runs: the requests that have their final outcome so far.",
            ),
        ] = False,
    ) -> None:
        """Write one JSONL line per request, in input order: the latest attempt's outcome."""
        queue: JobQueue = queue_of(ctx)
        job = queue.get(job_id)
        if not job.done and not partial:
            raise typer.BadParameter(
                f"job {job.id} is still {job.status}; its results are ready once it ends "
                f"(see `jobqueue wait {job.short_id or job.id}`), or take those so far with "
                "--partial",
                param_hint="JOB_ID",
            )
        written = _write_results(queue, job, output, errors_only=errors_only, partial=partial)
        where = output if output is not None else "stdout"
        more = ""
        if partial and not job.done:
            more = f" ({job.request_counts.total - job.request_counts.done:,} still to come)"
        stderr.print(f"wrote {written:,} results to {where}{more}", markup=False)

    @app.command()
    def process(
        ctx: typer.Context,
        file: FileArgument,
        endpoint: EndpointOption,
        output: Annotated[
            Path,
            typer.Option("--output", "-o", help="Where the results go (written atomically)."),
        ],
        completion_window: WindowOption = None,
        metadata: MetadataOption = None,
        max_attempts: AttemptsOption = None,
        deadline: DeadlineOption = None,
        max_batch_requests: BatchRequestsOption = None,
        max_batch_bytes: BatchBytesOption = None,
        name: NameOption = None,
        max_cost: MaxCostOption = None,
        allow_duplicate: Annotated[
            bool,
            typer.Option(
                "--allow-duplicate",
                help="Make a new job even if one for this file and options exists.",
            ),
        ] = False,
        errors_only: Annotated[
            bool, typer.Option("--errors-only", help="Only requests that did not succeed.")
        ] = False,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the job as JSON on stdout at the end.")
        ] = False,
    ) -> None:
        """Submit FILE, run it to the end here, write its results to OUTPUT: one command.

        Run again after a crash or Ctrl-C, it finds its job (by the file's content and the
        options) and goes on with it instead of making a second one; once the job has ended it
        writes its results again; a --max-cost other than its budget becomes its budget (a job
        its budget stopped goes on under a higher one). Exit codes as `run --until-done`.
        """
        queue: JobQueue = queue_of(ctx)
        options = submit_options(
            completion_window, metadata, max_attempts, deadline, max_batch_requests,
            max_batch_bytes,
        )  # fmt: skip
        job = None if allow_duplicate else queue.job_for_file(file, endpoint, **options)
        if job is not None:
            stderr.print(
                f"job {job_label(job)} ({job.status}) is this file's, with these options: "
                f"{'writing its results' if job.done else 'going on with it'}",
                markup=False,
            )
            if not job.done and max_cost is not None and max_cost != job.max_cost:
                job = queue.set_budget(job.id, max_cost)
                stderr.print(f"its budget is now ${max_cost:,.2f}", markup=False)
        else:
            job = queue.submit(
                file, endpoint, name=name, allow_duplicate=allow_duplicate, max_cost=max_cost,
                **options,
            )  # fmt: skip
            stderr.print(
                f"queued {job.request_counts.total:,} requests in {len(job.batches)} "
                f"batch{'es' if len(job.batches) != 1 else ''} as job {job_label(job)}",
                markup=False,
            )
        from jobqueue.core.records import RunReport
        from jobqueue.core.states import JobStatus

        report = RunReport()
        stop = threading.Event()
        if not job.done:
            job_id = job.id
            with _stop_on_signals(stop), JobProgress(stderr, stderr.is_terminal) as bar:
                bar.update(job)
                report = queue.run_until_done(
                    [job_id], stop=stop, on_poll=lambda _open: bar.update(queue.get(job_id))
                )
            job = queue.get(job_id)
        if not job.done:
            if job.needs_operator:
                stderr.print(
                    f"error: job {job_label(job)} cannot go on: {job.problem}; fix that and run "
                    "this command again (it goes on with the same job)",
                    markup=False,
                )
                raise typer.Exit(EXIT_TROUBLE)
            stderr.print(
                f"stopped; job {job_label(job)} is still {job.status}: run this command again to "
                "go on with it",
                markup=False,
            )
            raise typer.Exit(EXIT_INTERRUPTED)
        written = _write_results(queue, job, output, errors_only=errors_only, partial=False)
        if as_json:
            print_json(job.to_dict())
        stderr.print(
            f"job {job_label(job)} {job.status}: {_summary(job)}; wrote {written:,} results to "
            f"{output}",
            markup=False,
        )
        code = EXIT_COMPLETED if job.status == JobStatus.COMPLETED else EXIT_NOT_COMPLETED
        raise typer.Exit(_report(report, code))

    from jobqueue.cli.demo import demo_command

    app.command("demo")(demo_command)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` meanwhile (the handlers before are put back after)."""

    def on_signal(signum: int, _frame: Any) -> None:
        stderr.print(f"received {signal.Signals(signum).name}, stopping")
        stop.set()

    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _report(report: RunReport, code: int) -> int:
    """Print what went wrong in a run (failed duties, jobs held up by a problem) and return
    the exit code: `code`, or EXIT_TROUBLE when something did."""
    for duty, error in sorted(report.failed_duties.items()):
        stderr.print(f"error: the {duty} duty failed: {error}", markup=False)
    for job in report.still_open:
        if job.problem:
            stderr.print(f"job {job_label(job)} {job.status}: {job.problem}", markup=False)
    if report.failed_duties or report.blocked:
        return EXIT_TROUBLE
    return code


def _write_results(
    queue: JobQueue, job: Job, output: Path | None, *, errors_only: bool, partial: bool
) -> int:
    from jobqueue.api import JobQueueError

    if output is None:
        try:
            written = queue.export_results(
                job.id, sys.stdout.buffer, errors_only=errors_only, partial=partial
            )
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise JobQueueError(f"cannot write the results to stdout: {exc.strerror}") from None
        return written
    part = output.with_name(output.name + ".part")
    try:
        with part.open("wb", buffering=1 << 20) as f:
            written = queue.export_results(job.id, f, errors_only=errors_only, partial=partial)
            f.flush()
            os.fsync(f.fileno())
        part.replace(output)
    except BaseException as exc:
        part.unlink(missing_ok=True)  # never a half-written file left behind
        if isinstance(exc, OSError):
            raise JobQueueError(
                f"cannot write {output}: {exc.strerror or exc}; nothing was written"
            ) from None
        raise
    return written


def _describe(job: Job) -> str:
    statuses = Counter(b.status for b in job.batches)
    parts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    return f"{job.status} [{parts}]" if parts else job.status


def _summary(job: Job) -> str:
    c = job.request_counts
    return f"{c.completed:,} succeeded, {c.failed:,} failed of {c.total:,} requests"
