"""The commands that run or follow the duties: `run`, `wait`, `results`, `demo`.

Registered on the main app by `jobqueue.cli.app`; kept apart so the daemon's imports (APScheduler,
the remote client) load only for the commands that need them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jobqueue.api import JobQueue
from jobqueue.core.records import Job

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_COMPLETED = 0
EXIT_NOT_COMPLETED = 1
EXIT_TIMEOUT = 3


def register(app: typer.Typer, queue_of: Any, print_json: Any) -> None:
    """Add the commands to `app`; `queue_of(ctx)` gives the JobQueue of a command."""

    @app.command()
    def run(
        ctx: typer.Context,
        once: Annotated[
            bool, typer.Option("--once", help="Run the duties until nothing moves, then exit.")
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

        SIGTERM or SIGINT stops it cleanly: steps in hand finish, leases are released.
        """
        queue: JobQueue = queue_of(ctx)
        if once:
            moved = queue.run_once()
            stderr.print(f"nothing more to do now ({moved} steps taken)")
            return
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            stderr.print(f"received {signal.Signals(signum).name}, stopping")
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        queue.run(stop, listen=listen or queue.settings.listen)

    @app.command()
    def wait(
        ctx: typer.Context,
        job_id: Annotated[
            str, typer.Argument(help="A job id (or unique prefix).", metavar="JOB_ID")
        ],
        timeout: Annotated[
            float | None, typer.Option("--timeout", help="Give up after this many seconds.")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
    ) -> None:
        """Wait for a job to end, with a progress bar on stderr.

        Exit 0 when it completed, 1 when it ended otherwise (failed, cancelled, expired), 3 on
        timeout.
        """
        queue: JobQueue = queue_of(ctx)
        job = queue.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        show = stderr.is_terminal and not as_json
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=stderr,
            disable=not show,
            transient=False,
        ) as progress:
            task = progress.add_task(_describe(job), total=job.request_counts.total)
            while not job.done:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
                job = queue.get(job.id)
                progress.update(task, completed=_done(job), description=_describe(job))
        if as_json:
            print_json(job.to_dict())
        else:
            stderr.print(f"{job.id} {job.status}: {_summary(job)}")
        if not job.done:
            raise typer.Exit(EXIT_TIMEOUT)
        raise typer.Exit(EXIT_COMPLETED if job.status == "completed" else EXIT_NOT_COMPLETED)

    @app.command()
    def results(
        ctx: typer.Context,
        job_id: Annotated[
            str, typer.Argument(help="A job id (or unique prefix).", metavar="JOB_ID")
        ],
        output: Annotated[
            Path | None,
            typer.Option("--output", "-o", help="Write here (atomically) instead of stdout."),
        ] = None,
        errors_only: Annotated[
            bool, typer.Option("--errors-only", help="Only requests that did not succeed.")
        ] = False,
    ) -> None:
        """Write one JSONL line per request, in input order: the latest attempt's outcome."""
        queue: JobQueue = queue_of(ctx)
        job = queue.get(job_id)
        if not job.done:
            raise typer.BadParameter(
                f"job {job.id} is still {job.status}; its results are ready once it ends "
                f"(see `jobqueue wait {job.id}`)",
                param_hint="JOB_ID",
            )
        if output is None:
            written = queue.export_results(job.id, sys.stdout.buffer, errors_only=errors_only)
            sys.stdout.flush()
        else:
            part = output.with_name(output.name + ".part")
            try:
                with part.open("wb", buffering=1 << 20) as f:
                    written = queue.export_results(job.id, f, errors_only=errors_only)
                    f.flush()
                    os.fsync(f.fileno())
                part.replace(output)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        where = output if output is not None else "stdout"
        stderr.print(f"wrote {written:,} results to {where}")

    from jobqueue.cli.demo import demo_command

    app.command("demo")(demo_command)


def _done(job: Job) -> int:
    return job.request_counts.completed + job.request_counts.failed


def _describe(job: Job) -> str:
    statuses = Counter(b.status for b in job.batches)
    parts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    return f"{job.status} [{parts}]" if parts else job.status


def _summary(job: Job) -> str:
    c = job.request_counts
    return f"{c.completed:,} succeeded, {c.failed:,} failed of {c.total:,} requests"
