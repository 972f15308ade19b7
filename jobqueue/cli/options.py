"""Arguments and options that several commands share: a JOB argument (with shell completion of
job ids and names), the options of a submit (`submit`, `process`), and how a job is named."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from jobqueue.core.records import Job


def complete_job(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Shell completion of a JOB argument: the newest jobs' short ids and names."""
    # Completing, click parses the line without running the root callback: the global options
    # are in the root's params.
    params = ctx.find_root().params
    try:
        from jobqueue.api import JobQueue

        with JobQueue(
            config=params.get("config"),
            database_url=params.get("database_url"),
            data_dir=params.get("data_dir"),
        ) as queue:
            jobs = queue.jobs(limit=200)
    except Exception:  # completion never fails loudly
        return []
    out: list[tuple[str, str]] = []
    for job in jobs:
        help_text = f"{job.status} {Path(job.source).name}"
        for value in (job.short_id, job.name):
            if value and value.startswith(incomplete):
                out.append((value, help_text))
    return out


JobArgument = Annotated[
    str,
    typer.Argument(
        help="A job: its id, its name, or a unique prefix of either part of its id.",
        metavar="JOB_ID",
        autocompletion=complete_job,
    ),
]


FileArgument = Annotated[
    Path, typer.Argument(help="JSONL of requests: custom_id, method, url, body.", metavar="FILE")
]
EndpointOption = Annotated[
    str, typer.Option("--endpoint", "-e", help="Remote endpoint, e.g. /v1/chat/completions.")
]
WindowOption = Annotated[
    str | None,
    typer.Option("--completion-window", help="Remote completion window. [default: 24h]"),
]
MetadataOption = Annotated[
    list[str] | None,
    typer.Option("--metadata", "-m", help="KEY=VALUE put on every remote batch; repeatable."),
]
AttemptsOption = Annotated[
    int | None,
    typer.Option(
        "--max-attempts", min=1, help="Attempts per request, retries included. [default: 3]"
    ),
]
DeadlineOption = Annotated[
    str | None,
    typer.Option("--deadline", help="End the job 'expired' after this long, e.g. 48h."),
]
BatchRequestsOption = Annotated[
    int | None,
    typer.Option("--max-batch-requests", min=1, help="Requests per remote batch. [default: 50000]"),
]
BatchBytesOption = Annotated[
    int | None,
    typer.Option(
        "--max-batch-bytes", min=1024, help="Bytes per batch input file. [default: 200 MB]"
    ),
]
NameOption = Annotated[
    str | None,
    typer.Option("--name", help="Name the job: it can be found by this name.", show_default=False),
]
MaxCostOption = Annotated[
    float | None,
    typer.Option(
        "--max-cost",
        metavar="USD",
        help="The job's budget in USD: no batch is submitted past it (raise it with `jobqueue "
        "budget`). [default: the config's max_cost, else none]",
        show_default=False,
    ),
]
DuplicateOption = Annotated[
    bool,
    typer.Option(
        "--allow-duplicate",
        help="Queue the file even if its job (same file, same options) is open.",
    ),
]


def submit_options(
    completion_window: str | None,
    metadata: list[str] | None,
    max_attempts: int | None,
    deadline: str | None,
    max_batch_requests: int | None,
    max_batch_bytes: int | None,
) -> dict[str, Any]:
    """The keyword arguments of `JobQueue.submit` the submit options stand for."""
    return {
        "completion_window": completion_window,
        "metadata": parse_metadata(metadata or []),
        "max_attempts": max_attempts,
        "deadline": deadline,
        "max_batch_requests": max_batch_requests,
        "max_batch_bytes": max_batch_bytes,
    }


def job_label(job: Job) -> str:
    """How a job is named in messages: its short id, and its name when it has one."""
    short = job.short_id or job.id
    return f"{short} ({job.name})" if job.name else short


def parse_metadata(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--metadata")
        out[key] = value
    return out
