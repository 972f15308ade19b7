"""The command line: a thin layer over the embedded API, talking to the daemon's database.

Logs and errors go to stderr; with `--json` a command prints only JSON on stdout. Errors are one
line, never a traceback: exit 2 for bad input, usage or configuration, 1 for anything else (a
full disk, a database that refuses).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

from jobqueue.cli.options import (
    AttemptsOption,
    BatchBytesOption,
    BatchRequestsOption,
    DeadlineOption,
    DuplicateOption,
    EndpointOption,
    FileArgument,
    JobArgument,
    MaxCostOption,
    MetadataOption,
    NameOption,
    WindowOption,
    complete_job,
    job_label,
    submit_options,
)
from jobqueue.core.costs import usd

# `--help`, `--version` and shell completion load neither the API (and through it the store,
# SQLAlchemy, the settings), the logging set-up nor the emulator: each command imports what it
# needs when it runs. Annotations name these types for mypy only; typer reads only the
# commands' own signatures, whose types are all here at run time.
if TYPE_CHECKING:
    from jobqueue.api import JobQueue
    from jobqueue.core.costs import Usage
    from jobqueue.core.records import CostReport, Delivery, Event, Job, SubmitPlan

app = typer.Typer(
    name="jobqueue",
    help="A durable job queue for OpenAI-style Batch APIs.",
    no_args_is_help=True,
    # `--install-completion` / `--show-completion`: typer's shell completion (bash, zsh, fish,
    # PowerShell), commands and options, job ids and names for JOB arguments.
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")

# Not on a terminal (a pipe, a log), tables keep full ids rather than fold to 80 columns.
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
JobStatusName = Literal["queued", "running", "completed", "failed", "cancelled", "expired"]


def _version(value: bool) -> None:
    if value:
        from jobqueue.version import __version__

        stdout.print(f"jobqueue {__version__}", markup=False)
        raise typer.Exit()


class _Context:
    def __init__(self, config: Path | None, overrides: dict[str, Any]) -> None:
        self.config = config
        self.overrides = overrides
        self._queue: JobQueue | None = None

    def queue(self) -> JobQueue:
        if self._queue is None:
            from jobqueue.api import JobQueue

            self._queue = JobQueue(config=self.config, **self.overrides)
        return self._queue

    def close(self) -> None:
        if self._queue is not None:
            self._queue.close()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", envvar="JOBQUEUE_CONFIG", help="TOML config file."),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="Overrides JOBQUEUE_DATABASE_URL.", show_default=False),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Overrides JOBQUEUE_DATA_DIR.", show_default=False),
    ] = None,
    log_level: Annotated[
        LogLevel,
        typer.Option(
            "--log-level",
            envvar="JOBQUEUE_LOG_LEVEL",
            help="debug, info, warning, error.",
            case_sensitive=False,
        ),
    ] = "info",
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="JOBQUEUE_LOG_FORMAT",
            help="auto (console on a terminal, else json), json, console.",
            case_sensitive=False,
        ),
    ] = "auto",
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    # A level given on purpose is kept; the default one goes quiet (warnings only) while the
    # process runs in the background of its terminal (`jobqueue run &` beside `jobqueue wait`).
    source = ctx.get_parameter_source("log_level")
    explicit = source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
    from jobqueue.logs import configure_logging

    configure_logging(log_level.lower(), log_format.lower(), quiet_in_background=not explicit)
    state = _Context(config, {"database_url": database_url, "data_dir": data_dir})
    ctx.obj = state
    ctx.call_on_close(state.close)


def _state(ctx: typer.Context) -> _Context:
    obj = ctx.find_root().obj
    assert isinstance(obj, _Context)
    return obj


def _print_json(value: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


# -- submit ---------------------------------------------------------------------------------


@app.command()
def submit(
    ctx: typer.Context,
    file: FileArgument,
    endpoint: EndpointOption,
    completion_window: WindowOption = None,
    metadata: MetadataOption = None,
    max_attempts: AttemptsOption = None,
    deadline: DeadlineOption = None,
    max_batch_requests: BatchRequestsOption = None,
    max_batch_bytes: BatchBytesOption = None,
    name: NameOption = None,
    allow_duplicate: DuplicateOption = False,
    max_cost: MaxCostOption = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate FILE and print the plan (batches, tokens, estimated cost); record "
            "nothing.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Validate and shard FILE, and queue it as one job. Prints the job id."""
    queue = _state(ctx).queue()
    options = submit_options(
        completion_window, metadata, max_attempts, deadline, max_batch_requests, max_batch_bytes
    )
    if dry_run:
        _print_plan(queue.plan(file, endpoint, name=name, max_cost=max_cost, **options), as_json)
        return
    job = queue.submit(
        file, endpoint, name=name, allow_duplicate=allow_duplicate, max_cost=max_cost, **options
    )
    if as_json:
        _print_json(
            {
                "id": job.id,
                "short_id": job.short_id,
                "name": job.name,
                "status": job.status,
                "batches": len(job.batches),
                "requests": job.request_counts.total,
                "max_cost": job.max_cost,
            }
        )
        return
    stdout.print(job.id)
    budget = f", budget {usd(job.max_cost)}" if job.max_cost is not None else ""
    stderr.print(
        f"queued {job.request_counts.total:,} requests in {len(job.batches)} "
        f"batch{'es' if len(job.batches) != 1 else ''} ({_size(job.bytes)}) as job "
        f"{job_label(job)}{budget}",
        markup=False,
    )


def _print_plan(plan: SubmitPlan, as_json: bool) -> None:
    if as_json:
        _print_json(plan.to_dict())
        return
    n = len(plan.shards)
    stdout.print(
        f"{plan.source}: {plan.requests:,} requests, {_size(plan.bytes)}, valid; would queue "
        f"{n} batch{'es' if n != 1 else ''} for {plan.endpoint} (nothing recorded)",
        markup=False,
    )
    table = Table(box=None, header_style="bold")
    columns = ("BATCH", "MODEL", "REQUESTS", "BYTES", "INPUT TOKENS", "MAX OUTPUT TOKENS", "COST")
    for column in columns:
        table.add_column(column, justify="left" if column == "MODEL" else "right")
    for shard in plan.shards:
        table.add_row(
            str(shard.index),
            Text(shard.model or "-"),
            f"{shard.requests:,}",
            _size(shard.bytes),
            f"~{shard.input_tokens:,}",
            "-" if shard.max_output_tokens is None else f"{shard.max_output_tokens:,}",
            _cost_range(shard.cost_min, shard.cost_max),
        )
    stdout.print(table)
    stdout.print()
    by_model = Table(box=None, header_style="bold", title_justify="left")
    for column in ("MODEL", "REQUESTS", "INPUT TOKENS", "MAX OUTPUT TOKENS", "ESTIMATED COST"):
        by_model.add_column(column, justify="left" if column == "MODEL" else "right")
    for model in plan.by_model:
        by_model.add_row(
            Text(model.model or "-"),
            f"{model.requests:,}",
            f"~{model.input_tokens:,}",
            "-" if model.max_output_tokens is None else f"{model.max_output_tokens:,}",
            _cost_range(model.cost_min, model.cost_max),
        )
    stdout.print(by_model)
    stdout.print(
        f"estimated input tokens ~{plan.input_tokens:,} (a heuristic: within a few % for "
        "English, ~15 % for other languages)",
        markup=False,
    )
    stdout.print(
        f"estimated cost {_cost_range(plan.cost_min, plan.cost_max)} at Batch API prices of "
        f"{plan.prices_date or 'unknown date'} (from the input alone to the most output the "
        "requests allow; '?' where some request sets no bound on its output)",
        markup=False,
    )
    if plan.unpriced:
        refuse = "; submit with a budget would refuse it" if plan.max_cost is not None else ""
        stdout.print(
            f"note: no price for {', '.join(plan.unpriced)}: its cost is unknown{refuse} "
            '(add one under [prices."model-name"] in the config)',
            markup=False,
        )
    if plan.max_cost is not None and plan.cost_min is not None and plan.cost_min > plan.max_cost:
        stdout.print(
            f"note: the budget of {usd(plan.max_cost)} is below even the input's cost: the "
            "job would stop before its first batch",
            markup=False,
        )
    if plan.duplicate_of:
        stdout.print(
            f"note: job {plan.duplicate_of} for this file and options is still open; submit "
            "would refuse it without --allow-duplicate",
            markup=False,
        )


def _cost_range(low: float | None, high: float | None) -> str:
    """`$0.12 - $0.48`, `$0.12 - ?` (no output bound), or `unknown` (no price)."""
    if low is None:
        return "unknown"
    if high is None:
        return f"{usd(low)} - ?"
    if high == low:
        return usd(low)
    return f"{usd(low)} - {usd(high)}"


# -- status ---------------------------------------------------------------------------------


@app.command()
def status(
    ctx: typer.Context,
    job_id: Annotated[
        str | None,
        typer.Argument(
            help="A job: its id, its name, or a unique prefix of either part of its id.",
            metavar="JOB_ID",
            autocompletion=complete_job,
        ),
    ] = None,
    filter_status: Annotated[
        JobStatusName | None, typer.Option("--status", help="Only jobs in this status.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many jobs.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """A table of jobs, or one job with its batches."""
    queue = _state(ctx).queue()
    if job_id is None:
        jobs = queue.jobs(filter_status, limit=limit)
        if as_json:
            _print_json([{k: v for k, v in j.to_dict().items() if k != "batches"} for j in jobs])
        else:
            stdout.print(_jobs_table(jobs))
        return
    job = queue.get(job_id)
    if as_json:
        _print_json(job.to_dict())
    else:
        _print_job(job)


def _jobs_table(jobs: list[Job]) -> Table | str:
    if not jobs:
        return "no jobs"
    table = Table(box=None, header_style="bold")
    columns = ["JOB", "NAME", "STATUS", "ENDPOINT", "DONE", "FAILED", "COST", "CREATED", "SOURCE"]
    budgets = any(job.max_cost is not None for job in jobs)
    if budgets:
        columns.insert(columns.index("COST") + 1, "BUDGET")
    problems = any(job.problem and not job.done for job in jobs)
    if problems:
        columns.append("PROBLEM")
    for column in columns:
        right = column in ("DONE", "FAILED", "COST", "BUDGET")
        table.add_column(column, justify="right" if right else "left")
    for job in jobs:
        counts = job.request_counts
        row: list[Any] = [
            job.short_id or job.id,
            Text(job.name or "-"),
            _status_text(job.status),
            job.endpoint,
            f"{counts.done:,}/{counts.total:,}",
            f"{counts.failed:,}",
            _cost_text(job.usage, job.cost),
            *([usd(job.max_cost) if job.max_cost is not None else "-"] if budgets else []),
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            Text(Path(job.source).name),
        ]
        if problems:
            row.append(Text(job.problem if job.problem and not job.done else "-"))
        table.add_row(*row)
    return table


def _print_job(job: Job) -> None:
    counts = job.request_counts
    stdout.print(f"[bold]{job.id}[/bold]  {_status_text(job.status)}")
    stdout.print(f"  short id   {job.short_id or job.id}", markup=False)
    if job.name:
        stdout.print(f"  name       {job.name}", markup=False)
    if job.problem and not job.done:
        since = f" (since {job.problem_at:%H:%M:%S %Z})" if job.problem_at else ""
        stdout.print(Text(f"  problem    {job.problem}{since}", style="yellow"))
    if job.retry_of:
        stdout.print(f"  retry of   {job.retry_of}", markup=False)
    stdout.print(f"  endpoint   {job.endpoint}  (window {job.completion_window})")
    stdout.print(f"  source     {job.source}  ({_size(job.bytes)})")
    stdout.print(
        f"  requests   {counts.total:,} total, {counts.completed:,} succeeded, "
        f"{counts.failed:,} failed"
    )
    usage = job.usage
    if usage is not None:
        stdout.print(f"  tokens     {_tokens_text(usage)}", markup=False)
    collected = " (batches collected so far)" if not job.done and usage is not None else ""
    stdout.print(f"  cost       {_cost_text(usage, job.cost)}{collected}", markup=False)
    if len(job.cost_by_model) > 1:
        for model, cost in job.cost_by_model.items():
            stdout.print(f"             {model or '-'}: {usd(cost)}", markup=False)
    if job.max_cost is not None:
        stdout.print(f"  budget     {usd(job.max_cost)}", markup=False)
    if job.estimate is not None:
        est = job.estimate
        out = "unbounded" if est.max_output_tokens is None else f"at most {est.max_output_tokens:,}"
        stdout.print(
            f"  estimate   {_cost_range(est.cost_min, est.cost_max)} "
            f"(~{est.input_tokens:,} tokens in, {out} out; at submit)",
            markup=False,
        )
    stdout.print(f"  created    {job.created_at:%Y-%m-%d %H:%M:%S %Z}")
    if job.deadline_at:
        stdout.print(f"  deadline   {job.deadline_at:%Y-%m-%d %H:%M:%S %Z}")
    if job.finished_at:
        stdout.print(f"  finished   {job.finished_at:%Y-%m-%d %H:%M:%S %Z}")
    if job.error:
        stdout.print(f"  error      {job.error}")
    if job.cancel_requested and not job.done:
        stdout.print("  cancel requested: the daemon is cancelling its remote batches")
    if not job.batches:
        return
    table = Table(box=None, header_style="bold")
    columns = ("BATCH", "REMOTE", "STATUS", "ATTEMPT", "REQUESTS", "OK", "FAILED", "MODEL")
    for column in (*columns, "TOKENS IN/OUT", "COST"):
        table.add_column(column)
    for batch in job.batches:
        bc = batch.request_counts
        table.add_row(
            batch.id,
            batch.remote_id or "-",
            _status_text(batch.status),
            str(batch.attempt),
            f"{bc.total:,}",
            f"{bc.completed:,}",
            f"{bc.failed:,}",
            batch.model or "-",
            "-"
            if batch.usage is None
            else f"{batch.usage.input_tokens:,}/{batch.usage.output_tokens:,}",
            _cost_text(batch.usage, batch.cost),
        )
    stdout.print()
    stdout.print(table)


def _cost_text(usage: Usage | None, cost: float | None) -> str:
    """`-` while nothing is collected, else the cost (`unknown` for a model without a price)."""
    return "-" if usage is None else usd(cost)


def _tokens_text(usage: Usage) -> str:
    return (
        f"{usage.input_tokens:,} input ({usage.cached_input_tokens:,} cached), "
        f"{usage.output_tokens:,} output ({usage.reasoning_tokens:,} reasoning)"
    )


_STATUS_STYLE = {
    "completed": "green",
    "failed": "red",
    "expired": "yellow",
    "cancelled": "magenta",
    "cancelling": "magenta",
    "running": "cyan",
    "in_progress": "cyan",
    "validating": "blue",
    "finalizing": "blue",
    "submitting": "blue",
}


def _status_text(status: str) -> str:
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return f"{n} B"


# -- cancel, events ---------------------------------------------------------------------------


@app.command()
def cancel(
    ctx: typer.Context,
    job_id: JobArgument,
    as_json: JsonOption = False,
) -> None:
    """Cancel a job: queued batches end now, submitted ones are cancelled remotely by the daemon."""
    job = _state(ctx).queue().cancel(job_id)
    if as_json:
        _print_json(job.to_dict())
        return
    from jobqueue.core.states import BATCH_TERMINAL

    open_batches = sum(1 for b in job.batches if b.status not in BATCH_TERMINAL)
    if job.done:
        stdout.print(f"{job.id} {job.status}", markup=False)
    else:
        stdout.print(
            f"{job.id} cancelling ({open_batches} remote "
            f"batch{'es' if open_batches != 1 else ''} to cancel)",
            markup=False,
        )


@app.command()
def retry(
    ctx: typer.Context,
    job_id: JobArgument,
    codes: Annotated[
        list[str] | None,
        typer.Option(
            "--code",
            metavar="CODE",
            help="Only requests that failed with this error code (batch_expired, server_error, "
            "…) or HTTP status (500); repeatable. [default: every failed request]",
        ),
    ] = None,
    name: NameOption = None,
    as_json: JsonOption = False,
) -> None:
    """A new attempt at an ended job's failed requests: a new job, linked to the old one.

    Prints the new job's id. The old job and its results stay as they are; the new job's
    results hold the retried requests, in the old input order.
    """
    queue = _state(ctx).queue()
    job = queue.retry(job_id, codes=codes or (), name=name)
    if as_json:
        _print_json(
            {
                "id": job.id,
                "short_id": job.short_id,
                "name": job.name,
                "retry_of": job.retry_of,
                "status": job.status,
                "batches": len(job.batches),
                "requests": job.request_counts.total,
            }
        )
        return
    stdout.print(job.id)
    stderr.print(
        f"queued {job.request_counts.total:,} failed requests of {job.retry_of} again as job "
        f"{job_label(job)}",
        markup=False,
    )


@app.command()
def budget(
    ctx: typer.Context,
    job_id: JobArgument,
    usd_amount: Annotated[
        str,
        typer.Argument(
            metavar="USD", help="The job's new budget in USD, or 'none' to take it off."
        ),
    ],
    as_json: JsonOption = False,
) -> None:
    """Set an open job's budget: a job the budget stopped goes on once the new one allows its
    next batch (a daemon, or `jobqueue run`, submits it)."""
    value: float | None
    if usd_amount.strip().lower() == "none":
        value = None
    else:
        try:
            value = float(usd_amount.strip().removeprefix("$"))
        except ValueError:
            raise typer.BadParameter(
                f"expected an amount of USD (e.g. 12.50) or 'none', not {usd_amount!r}",
                param_hint="USD",
            ) from None
        if not value > 0 or value == float("inf"):
            raise typer.BadParameter("the budget must be more than 0 USD", param_hint="USD")
    job = _state(ctx).queue().set_budget(job_id, value)
    if as_json:
        _print_json(job.to_dict())
        return
    spent = _cost_text(job.usage, job.cost)
    stdout.print(
        f"job {job_label(job)}: budget {usd(job.max_cost) if value is not None else 'none'} "
        f"(spent so far {spent})",
        markup=False,
    )


@app.command()
def cost(
    ctx: typer.Context,
    job_ids: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[JOB]...",
            help="Only these jobs (ids, names or prefixes). [default: every job]",
            autocompletion=complete_job,
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="DATE",
            help="Only jobs created since DATE: 2026-11-01, 2026-11-01T12:00 (UTC unless it "
            "says), or a duration ago (7d, 12h).",
            show_default=False,
        ),
    ] = None,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            metavar="model|job|metadata KEY",
            help="Sum by model, by job, or by the value of a metadata key (`--by metadata "
            "team`, or `--by metadata=team`).",
        ),
    ] = "model",
    as_json: JsonOption = False,
) -> None:
    """What jobs cost: the tokens of their collected batches at Batch API prices, summed.

    A model without a price shows its cost as unknown, never as 0.
    """
    args = list(job_ids or [])
    group, sep, key = by.replace(":", "=", 1).partition("=")
    if group == "metadata" and not sep:
        if not args:
            raise typer.BadParameter(
                "--by metadata needs a KEY: --by metadata team", param_hint="--by"
            )
        key = args.pop(0)
    elif group != "metadata" and sep:
        raise typer.BadParameter(f"--by {group} takes no KEY", param_hint="--by")
    if group not in ("model", "job", "metadata"):
        raise typer.BadParameter(
            f"expected model, job or metadata KEY, not {by!r}", param_hint="--by"
        )
    report = (
        _state(ctx)
        .queue()
        .cost_report(
            args or None,
            since=_since(since) if since is not None else None,
            by=group,
            key=key if group == "metadata" else None,
        )
    )
    if as_json:
        _print_json(report.to_dict())
        return
    _print_costs(report)


def _since(text: str) -> float:
    """`--since`: an ISO date or time (UTC unless it names a zone), or a duration ago."""
    import time
    from datetime import UTC, datetime

    from jobqueue.core.durations import parse_duration

    raw = text.strip()
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        try:
            return time.time() - parse_duration(raw)
        except ValueError:
            raise typer.BadParameter(
                f"expected a date (2026-11-01), a time (2026-11-01T12:00) or a duration ago "
                f"(7d), not {text!r}",
                param_hint="--since",
            ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _print_costs(report: CostReport) -> None:
    if not report.lines:
        stdout.print("no collected usage" + (" since then" if report.since else ""))
        return
    heading = {"model": "MODEL", "job": "JOB", "metadata": (report.key or "").upper()}
    table = Table(box=None, header_style="bold")
    columns = [heading[report.by], "JOBS", "BATCHES", "INPUT", "CACHED", "OUTPUT", "REASONING"]
    for column in (*columns, "COST"):
        table.add_column(column, justify="left" if column == columns[0] else "right")

    def row(label: str, jobs: int, batches: int, usage: Usage, amount: float | None) -> list[Any]:
        return [
            Text(label), f"{jobs:,}", f"{batches:,}", f"{usage.input_tokens:,}",
            f"{usage.cached_input_tokens:,}", f"{usage.output_tokens:,}",
            f"{usage.reasoning_tokens:,}", usd(amount),
        ]  # fmt: skip

    for line in report.lines:
        label = line.key if line.key is not None else "-"
        if line.name:
            label = f"{label} ({line.name})"
        table.add_row(*row(label, line.jobs, line.batches, line.usage, line.cost))
    batches = sum(line.batches for line in report.lines)
    table.add_row(*row("total", report.jobs, batches, report.usage, report.cost), style="bold")
    stdout.print(table)
    if report.unpriced:
        stdout.print(
            f"no price for {', '.join(report.unpriced)}: its cost is unknown "
            '(add one under [prices."model-name"] in the config)',
            markup=False,
        )


@app.command()
def events(
    ctx: typer.Context,
    job_id: Annotated[
        str | None,
        typer.Argument(
            help="Only this job's events.", metavar="JOB_ID", autocompletion=complete_job
        ),
    ] = None,
    after: Annotated[
        int | None,
        typer.Option(
            "--after", help="Only events after this sequence number (the first --limit of them)."
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=1, help="At most this many events: the newest, or with --after the next."
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep printing new events as they arrive, until Ctrl-C."
        ),
    ] = False,
    dead: Annotated[
        bool, typer.Option("--dead", help="List dead-lettered hook deliveries instead.")
    ] = False,
    redeliver: Annotated[
        str | None,
        typer.Option(
            "--redeliver",
            metavar="EVENT_ID",
            help="Queue this event's dead (or delivered) hook deliveries again.",
        ),
    ] = None,
    sink: Annotated[
        str | None, typer.Option("--sink", help="With --redeliver: only this sink.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The events of one job or all jobs, in order, with their hook deliveries."""
    if sink is not None and redeliver is None:
        raise typer.BadParameter("--sink goes with --redeliver EVENT_ID", param_hint="--sink")
    queue = _state(ctx).queue()
    if redeliver is not None:
        _redeliver(queue, redeliver, sink, as_json)
        return
    if dead:
        _print_dead(queue, job_id, limit, as_json)
        return
    found = queue.events(job_id, after=after, limit=limit)
    deliveries = queue.deliveries(e.seq for e in found)
    if follow:
        for e in found:
            _print_event_line(e, deliveries.get(e.seq, []), as_json)
        _follow(queue, job_id, found[-1].seq if found else (after or 0), as_json)
        return
    if as_json:
        _print_json([_event_json(e, deliveries.get(e.seq, [])) for e in found])
        return
    stdout.print(_events_table(found, deliveries))


FOLLOW_POLL_SECONDS = 0.5


def _event_json(e: Event, deliveries: list[Delivery]) -> dict[str, Any]:
    return {"seq": e.seq, **e.to_payload(), "deliveries": [d.summary() for d in deliveries]}


def _delivery_text(deliveries: list[Delivery]) -> str:
    """Per sink: `webhook:…: delivered`, `cmd: dead (8 attempts)`, `py: pending (2 attempts)`."""
    if not deliveries:
        return "-"
    parts = []
    for d in deliveries:
        text = f"{d.sink}: {d.status}"
        if d.status != "delivered" and d.attempts:
            text += f" ({d.attempts} attempt{'s' if d.attempts != 1 else ''})"
        parts.append(text)
    return ", ".join(parts)


def _events_table(found: list[Event], deliveries: dict[int, list[Delivery]]) -> Table | str:
    if not found:
        return "no events"
    table = Table(box=None, header_style="bold")
    for column in ("SEQ", "TIME", "TYPE", "JOB", "BATCH", "FROM", "TO", "DELIVERY"):
        table.add_column(column)
    for e in found:
        table.add_row(
            str(e.seq),
            e.created_at.strftime("%H:%M:%S.%f")[:-3],
            e.type,
            e.job_id or "-",
            e.batch_id or "-",
            e.from_status or "-",
            e.to_status or "-",
            Text(_delivery_text(deliveries.get(e.seq, []))),  # sink names are not markup
        )
    return table


def _print_event_line(e: Event, deliveries: list[Delivery], as_json: bool) -> None:
    """One event on one line: a JSON object with --json, else the table's columns."""
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(_event_json(e, deliveries)) + b"\n")
    else:
        fields = (
            str(e.seq),
            e.created_at.strftime("%H:%M:%S.%f")[:-3],
            e.type,
            e.job_id or "-",
            e.batch_id or "-",
            f"{e.from_status or '-'} -> {e.to_status or '-'}",
            _delivery_text(deliveries),
        )
        sys.stdout.write("  ".join(fields) + "\n")
    sys.stdout.flush()


def _follow(queue: JobQueue, job_id: str | None, last_seq: int | None, as_json: bool) -> None:
    """Poll the database for events after `last_seq` and print them, until Ctrl-C."""
    import time

    try:
        while True:
            time.sleep(FOLLOW_POLL_SECONDS)
            for e in queue.events(job_id, after=last_seq):
                _print_event_line(e, [], as_json)
                last_seq = e.seq
    except KeyboardInterrupt:
        return


def _print_dead(queue: JobQueue, job_id: str | None, limit: int | None, as_json: bool) -> None:
    dead = queue.dead_deliveries(job_id, limit=limit)
    if as_json:
        _print_json([d.to_dict() for d in dead])
        return
    if not dead:
        stdout.print("no dead deliveries")
        return
    table = Table(box=None, header_style="bold")
    for column in ("EVENT", "TYPE", "JOB", "SINK", "ATTEMPTS", "LAST ERROR"):
        table.add_column(column)
    for d in dead:
        table.add_row(
            d.event_id,
            d.event_type,
            d.job_id or "-",
            Text(d.sink),
            str(d.attempts),
            Text(d.last_error or "-"),
        )
    stdout.print(table)


def _redeliver(queue: JobQueue, event_id: str, sink: str | None, as_json: bool) -> None:
    count = queue.redeliver(event_id, sink)
    if as_json:
        _print_json({"event_id": event_id, "sink": sink, "redelivered": count})
        return
    if count:
        stdout.print(
            f"queued {count} deliver{'ies' if count != 1 else 'y'} of {event_id} again",
            markup=False,
        )
    else:
        stdout.print(
            f"no dead or delivered deliveries of {event_id}"
            + (f" to {sink}" if sink else "")
            + " (pending ones are still being tried)",
            markup=False,
        )


# -- db -------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Bring the database schema up to date (jobqueue also does this when it opens one)."""
    revision = _state(ctx).queue().upgrade_database()
    stderr.print(f"database at revision {revision}")


@db_app.command("current")
def db_current(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the database's schema revision and the code's."""
    from jobqueue.api import JobQueue

    state = _state(ctx)
    current, head = JobQueue.schema_revisions(state.config, **state.overrides)
    if as_json:
        _print_json({"current": current, "head": head})
    else:
        stdout.print(f"current {current or '(empty)'}, head {head}")


EMULATOR_HELP = "Serve a local OpenAI-compatible Batch and Files API."


class _EmulatorCommand(TyperCommand):
    """`jobqueue emulator`, whose module (its options, Starlette, uvicorn) loads only when the
    command runs, shows its own help or completes its options: the list of commands in
    `jobqueue --help` and in shell completion needs only its name and help."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        return _emulator_command().make_context(info_name, args, parent=parent, **extra)


def _emulator_command() -> TyperCommand:
    """The real `jobqueue emulator` command, as typer makes it from `emulator_command`."""
    from jobqueue.emulator.command import emulator_command

    single = typer.Typer(
        add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
    )
    single.command("emulator", help=EMULATOR_HELP)(emulator_command)
    command = typer.main.get_command(single)
    assert isinstance(command, TyperCommand)
    return command


def _register_optional_commands() -> None:
    from jobqueue.cli import running

    running.register(app, lambda ctx: _state(ctx).queue(), _print_json)

    @app.command("emulator", cls=_EmulatorCommand, help=EMULATOR_HELP)
    def _emulator() -> None:  # a stand-in: `_EmulatorCommand` runs the real command
        raise AssertionError("jobqueue emulator runs emulator_command")


_register_optional_commands()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every error, click's usage errors included, is one line on stderr."""
    command = typer.main.get_command(app)
    # Each `except` names its classes only once an exception gets there, and only those of
    # modules that are loaded (`_raised`): `--help` loads neither the API nor the settings.
    try:
        code = command.main(args=argv, prog_name="jobqueue", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _raised("NoArgsIsHelpError", *_CLICK) as exc:
        help_error: Any = exc
        help_error.show()  # `jobqueue` alone: the help, as before
        return int(help_error.exit_code)
    except _raised("UsageError", *_CLICK) as exc:
        usage: Any = exc
        where = usage.ctx.command_path if usage.ctx is not None else "jobqueue"
        message = _one_line(usage.format_message())
        stderr.print(f"error: {message} (see `{where} --help`)", markup=False)
        return int(usage.exit_code)
    except _raised("ClickException", *_CLICK) as exc:
        failure: Any = exc
        stderr.print(f"error: {_one_line(failure.format_message())}", markup=False)
        return int(failure.exit_code)
    except _raised("Abort", *_CLICK):
        return 130
    except _raised("InputError", _INPUTS) + _raised("ConfigError", _SETTINGS) as exc:
        stderr.print(f"error: {exc}", markup=False)
        return 2
    except _raised("JobQueueError", _API) as exc:
        error: Any = exc
        stderr.print(f"error: {error}", markup=False)
        return int(error.exit_code)
    except _raised("DaemonAlreadyRunning", _API) as exc:
        # `run` on a SQLite file another daemon runs on
        stderr.print(f"error: {exc}", markup=False)
        return 2
    except _raised("StoreError", _API) as exc:
        stderr.print(f"error: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`jobqueue results … | head`): nothing more to say.
        _silence_stdout()
        return 141
    except OSError as exc:
        # The machine, not the input: a full disk, a read-only mount, a lost file system.
        stderr.print(f"error: {_os_error(exc)}", markup=False)
        return 1
    except _raised("DatabaseError", _API) as exc:
        # The database refused (e.g. "database or disk is full"); the driver's own message
        # only, without the statement and its parameters.
        refused: Any = exc
        stderr.print(f"error: database: {_one_line(str(refused.orig))}", markup=False)
        return 1
    return 0


# click's exceptions, from click and from the copy typer may carry (`typer._click`): the CLI
# prints them itself, in one line. The API's (and the store's, which it re-exports): whatever
# the CLI does with a database goes through the API, so with the API not loaded none was raised.
_CLICK = ("click.exceptions", "typer._click.exceptions")
_API = "jobqueue.api"
_INPUTS = "jobqueue.files.inputs"
_SETTINGS = "jobqueue.settings"


def _raised(name: str, *modules: str) -> tuple[type[Exception], ...]:
    """The exception classes `name` of those of `modules` that are loaded: an exception of a
    module that is not loaded was not raised, and it stays unloaded."""
    found: list[type[Exception]] = []
    for module in modules:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            found.append(cls)
    return tuple(found)


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return _one_line(f"{where}{exc.strerror or exc}")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
