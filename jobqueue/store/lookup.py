"""Finding jobs the way people name them: an id, a name, or a prefix of either half of an id;
and the short forms shown for them.

A job id is `job_` + 12 hex digits of time + 12 random ones (`jobqueue.core.ids`). A typed
prefix (with or without `job_`) may be a prefix of the whole id or of its random part: the
random part is what the CLI shows, because jobs submitted close together share their time
digits. A short form is unique when no other job's id, read either way, starts with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Row, func, or_, select

from jobqueue.core.ids import MIN_SHORT, RANDOM_DIGITS, TIME_DIGITS, random_part, typed_digits
from jobqueue.store.tables import jobs_table

_HEAD = len("job_")
# Where the random digits start in an id, 1-based as SQL's substr counts.
_RANDOM_AT = _HEAD + TIME_DIGITS + 1
_CHUNK = 500


def find_jobs(conn: Connection, ref: str, *, limit: int = 11) -> list[Row[Any]]:
    """The jobs `ref` names, newest first, at most `limit`: the job with that id or that name
    (one), else those whose id or random part starts with the typed digits (one when the
    prefix is unique, more when it is ambiguous, none when nothing matches)."""
    j = jobs_table
    exact = conn.execute(select(j).where(or_(j.c.id == ref, j.c.name == ref))).all()
    if exact:
        # An id beats a name (a name never looks like an id, so both cannot match anyway).
        return sorted(exact, key=lambda row: row.id != ref)[:1]
    digits = typed_digits(ref)
    if digits is None:
        return []
    condition = [j.c.id.startswith(f"job_{digits}", autoescape=True)]
    if len(digits) <= RANDOM_DIGITS:
        condition.append(func.substr(j.c.id, _RANDOM_AT).startswith(digits, autoescape=True))
    return list(
        conn.execute(
            select(j).where(or_(*condition)).order_by(j.c.created_at.desc()).limit(limit)
        ).all()
    )


def job_by_name(conn: Connection, name: str) -> Row[Any] | None:
    j = jobs_table
    return conn.execute(select(j).where(j.c.name == name)).first()


def short_ids(conn: Connection, job_ids: Iterable[str]) -> dict[str, str]:
    """For each id, the shortest prefix of its random part, at least `MIN_SHORT` digits, that
    no other job's id starts with, read either way (random part, or time then random): what
    the CLI shows and a person can type back. An id of another shape is its own short form."""
    ids = list(dict.fromkeys(job_ids))
    out = {job_id: job_id for job_id in ids}
    pending = {job_id: r for job_id in ids if (r := random_part(job_id)) is not None}
    j = jobs_table
    length = MIN_SHORT
    while pending and length < RANDOM_DIGITS:
        prefixes = {job_id: r[:length] for job_id, r in pending.items()}
        counts: dict[str, int] = {}
        wanted = sorted(set(prefixes.values()))
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            for at in (_RANDOM_AT, _HEAD + 1):
                column = func.substr(j.c.id, at, length)
                rows = conn.execute(
                    select(column, func.count()).where(column.in_(chunk)).group_by(column)
                ).all()
                for prefix, n in rows:
                    counts[prefix] = counts.get(prefix, 0) + int(n)
        for job_id, prefix in prefixes.items():
            if counts.get(prefix, 0) <= 1:
                out[job_id] = prefix
                del pending[job_id]
        length += 1
    for job_id, r in pending.items():
        out[job_id] = r
    return out


def jobs_with_fingerprint(
    conn: Connection, fingerprint: str, *, open_only: bool = False
) -> list[Row[Any]]:
    """Jobs of one input file and options, newest first; with `open_only`, those still queued
    or running."""
    j = jobs_table
    query = select(j).where(j.c.fingerprint == fingerprint)
    if open_only:
        query = query.where(j.c.status.in_(["queued", "running"]))
    return list(conn.execute(query.order_by(j.c.created_at.desc(), j.c.id.desc())).all())


def open_jobs(conn: Connection, job_ids: Iterable[str] | None = None) -> list[Row[Any]]:
    """Jobs still queued or running (of `job_ids`, or all), oldest first."""
    j = jobs_table
    query = select(j).where(j.c.status.in_(["queued", "running"]))
    if job_ids is not None:
        query = query.where(j.c.id.in_(list(job_ids)))
    return list(conn.execute(query.order_by(j.c.created_at, j.c.id)).all())
