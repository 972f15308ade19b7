"""Problems: why a job is not moving, in a few words people can act on. Pure, no I/O.

A batch that cannot be submitted or refreshed puts a short problem on its job (`status`, `wait`,
`Job.problem`, the `job.problem` event). Each problem has a kind; some need the operator (a key,
a permission, a quota) and stop one-shot runs (`run --until-done`, `process`), the others (the
remote down, the enqueued-token limit) pass by themselves and are waited out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MAX_PROBLEM = 300


class ProblemKind(StrEnum):
    CREDENTIALS = "credentials"  # 401: no key, or a wrong one
    PERMISSION = "permission"  # 403
    QUOTA = "quota"  # 429 insufficient_quota: billing
    NOT_FOUND = "not_found"  # 404: a model, a file or a batch the remote does not know
    UNAVAILABLE = "unavailable"  # timeouts, refused connections, 5xx, 429 rate limits
    TOKEN_LIMIT = "token_limit"  # the enqueued-token limit: waits for running batches
    REFUSED = "refused"  # any other refusal
    BUDGET = "budget"  # the job's budget (`max_cost`) would be exceeded: raise it


# Kinds that do not pass by themselves: a one-shot run stops on them rather than wait for ever.
NEEDS_OPERATOR = frozenset(
    {ProblemKind.CREDENTIALS, ProblemKind.PERMISSION, ProblemKind.QUOTA, ProblemKind.BUDGET}
)


class ProblemSource(StrEnum):
    """Which duty saw it: only that duty's success clears it (a batch refreshed fine says
    nothing about another one that cannot be submitted)."""

    SUBMIT = "submit"
    REFRESH = "refresh"
    BUDGET = "budget"  # the submit duty's budget check: cleared when the budget is raised


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    text: str

    @property
    def needs_operator(self) -> bool:
        return self.kind in NEEDS_OPERATOR


def remote_problem(
    *,
    status: int | None,
    code: str | None,
    message: str,
    transient: bool,
    action: str = "submit",
) -> Problem:
    """The problem a failed remote call (`action`: "submit" or "refresh") puts on its job."""
    detail = ", ".join(str(p) for p in (status, code) if p)
    detail = f" ({detail})" if detail else ""
    if status == 401:
        return Problem(
            ProblemKind.CREDENTIALS,
            f"the remote refused the API key{detail}: check OPENAI_API_KEY",
        )
    if status == 403:
        return Problem(
            ProblemKind.PERMISSION,
            f"the remote refused permission{detail}: {_short(message)}",
        )
    if code == "insufficient_quota":
        return Problem(ProblemKind.QUOTA, f"the remote's quota is used up{detail}: check billing")
    if status == 404 or code == "model_not_found":
        return Problem(ProblemKind.NOT_FOUND, f"not found{detail}: {_short(message)}")
    if transient or (status is not None and (status >= 500 or status in (408, 429))):
        return Problem(
            ProblemKind.UNAVAILABLE,
            f"cannot {action}: the remote is unavailable{detail}: {_short(message)}",
        )
    return Problem(
        ProblemKind.REFUSED, f"the remote refused to {action}{detail}: {_short(message)}"
    )


def token_limit_problem(retry_in: float) -> Problem:
    return Problem(
        ProblemKind.TOKEN_LIMIT,
        f"the remote's enqueued-token limit is reached: waiting {_seconds(retry_in)} for "
        "running batches to finish",
    )


def budget_problem(max_cost: float, next_batch: float | None, unpriced: tuple[str, ...]) -> Problem:
    """The problem of a job whose next batch would take it past its budget (or whose cost
    cannot be known: a model without a price)."""
    if unpriced:
        return Problem(
            ProblemKind.BUDGET,
            f"cannot keep the budget of ${max_cost:,.2f}: no price for {', '.join(unpriced)} "
            '(add one under [prices."model-name"] in the config)',
        )
    estimate = f" (~${next_batch:,.4f})" if next_batch is not None else ""
    return Problem(
        ProblemKind.BUDGET,
        f"the budget of ${max_cost:,.2f} is reached: the next batch{estimate} would exceed it; "
        "raise it with `jobqueue budget JOB USD`",
    )


def _short(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _seconds(value: float) -> str:
    value = round(value)
    if value < 120:
        return f"{value}s"
    if value < 7200:
        return f"{value // 60}m"
    return f"{value // 3600}h{value % 3600 // 60:02d}m"
