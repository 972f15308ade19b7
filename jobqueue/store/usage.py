"""Tokens used: summed per batch while it is collected, and per job from its batches.

Each response body's `usage` is read while the batch's result files are scanned (no second
pass, see `jobqueue.files.results.scan_line_tokens`), kept per request in `outcomes`, and summed
into the batch's `input_tokens`, `cached_input_tokens`, `output_tokens` and `reasoning_tokens`
in the transaction that records its outcomes. Those columns are NULL until the batch is
collected (not known, never 0); a job's usage is the sum over its collected batches, by model
(`jobqueue.store.costs.usage_by_job_and_model`, what the API, `jobqueue cost` and the job's end
event read).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, update

from jobqueue.files.results import TOKEN_KINDS
from jobqueue.store.tables import batches_table


def record_batch_tokens(conn: Connection, batch_id: str, tokens: Mapping[str, int]) -> None:
    """Set the batch's token columns to `tokens` (kind -> count, every kind of `TOKEN_KINDS`).
    Written in the collect transaction, after the batch was marked collected under its lease
    (its row is held from there to the commit)."""
    b = batches_table
    conn.execute(
        update(b).where(b.c.id == batch_id).values({k: int(tokens[k]) for k in TOKEN_KINDS})
    )


def remote_tokens(usage: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The remote batch's own `usage` (`input_tokens`, `output_tokens`, their `*_details`) by
    our kinds; None when it reported none. A count it does not give is left out."""
    if not isinstance(usage, Mapping):
        return None
    found: dict[str, int] = {}
    for kind, value in (
        ("input_tokens", usage.get("input_tokens")),
        ("cached_input_tokens", _detail(usage, "input_tokens_details", "cached_tokens")),
        ("output_tokens", usage.get("output_tokens")),
        ("reasoning_tokens", _detail(usage, "output_tokens_details", "reasoning_tokens")),
    ):
        if isinstance(value, int) and not isinstance(value, bool):
            found[kind] = value
    return found or None


def _detail(usage: Mapping[str, Any], key: str, name: str) -> Any:
    details = usage.get(key)
    return details.get(name) if isinstance(details, Mapping) else None


def usage_mismatch(
    summed: Mapping[str, int], remote: Mapping[str, Any] | None
) -> dict[str, tuple[int, int]]:
    """Kinds where the tokens summed over the responses differ from the remote batch's own
    `usage`: kind -> (summed, remote). Empty when they agree or the remote gave no usage."""
    theirs = remote_tokens(remote)
    if not theirs:
        return {}
    return {k: (summed[k], v) for k, v in theirs.items() if summed.get(k) != v}
