"""`jobqueue demo`: the main job on the embedded default, end to end, in under a minute.

With no remote configured it starts the emulator in process, uses a temporary SQLite database,
submits a generated file of a few thousand requests split into several batches (with some request
failures and one batch that expires), runs the duties until the job ends, shows each state change
as it happens, and ends with a summary: batches, retries, outcomes, and where the results are.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

# The command imports the API, the emulator and the rest when it runs, not when it is
# registered (`jobqueue --help`).
if TYPE_CHECKING:
    from jobqueue.api import JobQueue
    from jobqueue.core.records import Event, Job

out = Console(highlight=False, soft_wrap=True)
DEMO_KEY = "sk-jobqueue-demo"


def write_demo_input(path: Path, requests: int, model: str) -> Path:
    topics = ["tides", "volcanoes", "compilers", "bees", "glaciers", "jazz", "prime numbers"]
    with path.open("wb") as f:
        for i in range(requests):
            line = {
                "custom_id": f"demo-{i:06d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [
                        {
                            "role": "user",
                            "content": f"One sentence about {topics[i % len(topics)]}.",
                        }
                    ],
                    "max_tokens": 40,
                },
            }
            f.write(orjson.dumps(line) + b"\n")
    return path


def demo_command(
    ctx: typer.Context,
    requests: Annotated[
        int, typer.Option("--requests", min=1, help="Requests to generate.")
    ] = 5000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Requests per remote batch.")
    ] = 1000,
    failure_rate: Annotated[
        float,
        typer.Option(
            "--failure-rate",
            min=0.0,
            max=1.0,
            help="Share of requests the emulator fails with a 500.",
        ),
    ] = 0.05,
    time_scale: Annotated[
        float,
        typer.Option("--time-scale", min=1.0, help="Emulator clock speed (3600: 24 h in 24 s)."),
    ] = 3600.0,
    remote: Annotated[
        bool,
        typer.Option(
            "--remote",
            help="Use the configured remote (JOBQUEUE_BASE_URL, OPENAI_API_KEY) and database "
            "instead of the emulator. Costs real money: keep --requests small.",
        ),
    ] = False,
    model: Annotated[
        str, typer.Option("--model", help="Model named in the requests.")
    ] = "gpt-4o-mini",
    port: Annotated[
        int,
        typer.Option(
            "--port", min=0, max=65535, help="The emulator's port on 127.0.0.1 (0: a free one)."
        ),
    ] = 0,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep", help="Keep the temporary directory (database, input, results) afterwards."
        ),
    ] = False,
) -> None:
    """Run a whole job end to end and show its lifecycle (the emulator unless --remote)."""
    from jobqueue.api import JobQueue
    from jobqueue.core.states import JobStatus
    from jobqueue.logs import configure_logging

    root = ctx.find_root().obj
    # The event feed is the show; routine logs would drown it.
    configure_logging("warning", "auto")
    started = time.monotonic()
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="jobqueue-demo-"))
        if not keep:
            # Registered first, so it runs last: after the queue and the emulator closed.
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        if remote:
            queue = JobQueue(config=root.config, **root.overrides)
        else:
            from jobqueue.emulator import EmulatorConfig, serve_in_thread

            emulator = stack.enter_context(
                serve_in_thread(
                    EmulatorConfig(
                        time_scale=time_scale,
                        seed=7,
                        request_failure_rate=failure_rate,
                        # About 180 requests a second: slow enough to watch, done in seconds.
                        requests_per_minute=3.0 * 3600.0 / time_scale,
                        data_dir=workdir / "emulator",
                    ),
                    port=port,
                )
            )
            # One batch runs out of its completion window half way: its finished requests are
            # kept, the rest are resubmitted in a retry batch.
            emulator.emulator.script_next(expire_at_fraction=0.5)
            queue = JobQueue(
                database_url=f"sqlite:///{workdir / 'jobqueue.db'}",
                data_dir=workdir / "data",
                base_url=emulator.base_url,
                api_key=DEMO_KEY,
                poll_interval=0.5,
                max_attempts=2,
            )
            out.print(f"emulator on {emulator.base_url} (clock x{time_scale:g}), data in {workdir}")
        stack.callback(queue.close)
        source = write_demo_input(workdir / "requests.jsonl", requests, model)
        job = queue.submit(source, "/v1/chat/completions", max_batch_requests=batch_size)
        out.print(
            f"submitted [bold]{job.id}[/bold]: {requests:,} requests in {len(job.batches)} batches"
        )
        labels = {b.id: f"batch {i + 1}" for i, b in enumerate(job.batches)}
        queue.start()
        job = _follow(queue, job, labels, started)
        results_path = workdir / "results.jsonl"
        with results_path.open("wb") as f:
            queue.export_results(job.id, f)
        _summary(queue, job, labels, results_path, time.monotonic() - started, keep)
    if not keep:
        out.print(f"[dim]removed {workdir} (--keep keeps it)[/dim]")
    if job.status != JobStatus.COMPLETED:
        raise typer.Exit(1)


def _follow(queue: JobQueue, job: Job, labels: dict[str, str], started: float) -> Job:
    last = 0
    while True:
        for event in queue.events(job.id, after=last):
            last = event.seq
            _print_event(event, labels, started)
        job = queue.get(job.id)
        if job.done:
            for event in queue.events(job.id, after=last):
                _print_event(event, labels, started)
            return job
        time.sleep(0.1)


def _print_event(event: Event, labels: dict[str, str], started: float) -> None:
    elapsed = f"{time.monotonic() - started:6.1f}s"
    if event.batch_id is not None and event.batch_id not in labels:
        labels[event.batch_id] = (
            f"retry {sum(1 for v in labels.values() if v.startswith('retry')) + 1}"
        )
    who = labels.get(event.batch_id or "", "job")
    if event.type == "job.problem":
        problem = event.data.get("problem")
        out.print(
            f"[dim]{elapsed}[/dim]  {who:<9} "
            + (f"problem: {problem}" if problem else "problem cleared")
        )
        return
    from jobqueue.core.states import BATCH_TERMINAL

    counts = event.data.get("request_counts") or {}
    detail = ""
    if event.to_status in BATCH_TERMINAL and counts:
        detail = f"  ({counts.get('completed', 0):,} ok, {counts.get('failed', 0):,} failed)"
    if event.data.get("retry_of"):
        detail = f"  (retrying {counts.get('total', 0):,} requests)"
    change = f"{event.from_status} → {event.to_status}" if event.from_status else event.to_status
    out.print(f"[dim]{elapsed}[/dim]  {who:<9} {change}{detail}")


def _summary(
    queue: JobQueue, job: Job, labels: dict[str, str], results_path: Path, seconds: float,
    keep: bool,
) -> None:  # fmt: skip
    job = queue.get(job.id)
    outcomes: Counter[str] = Counter()
    for record in queue.results(job.id):
        if record.get("error"):
            outcomes[record["error"].get("code") or "error"] += 1
        elif (record.get("response") or {}).get("status_code", 0) >= 300:
            outcomes[f"http {record['response']['status_code']}"] += 1
        else:
            outcomes["succeeded"] += 1
    retried = queue.retried_requests(job.id)
    shards = sum(1 for b in job.batches if b.attempt == 1)
    table = Table(title=f"{job.id} {job.status} in {seconds:.1f}s", box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    statuses = Counter(b.status for b in job.batches)
    table.add_row(
        "batches",
        f"{len(job.batches)} ({shards} shards, {len(job.batches) - shards} retry/requeue); "
        + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())),
    )
    table.add_row("requests", f"{job.request_counts.total:,}, {retried:,} of them retried")
    table.add_row("outcomes", ", ".join(f"{n:,} {k}" for k, n in outcomes.most_common()))
    if keep:
        table.add_row("results", f"{results_path} (one line per request, in input order)")
    database = queue.settings.effective_database_url
    if keep or str(results_path.parent) not in database:  # kept, or --remote's own database
        table.add_row(
            "database",
            f"{database}  (try: jobqueue --database-url {database} status {job.short_id})",
        )
    out.print()
    out.print(table)
