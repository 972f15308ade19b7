"""Identifiers: a prefix, then time-ordered hex, so ids sort by creation time.

A job id is `job_` + 12 hex digits of milliseconds + 12 random hex digits. Jobs submitted close
together share their leading digits, so the short form people see and type is a prefix of the
random part (`RANDOM_START` on), the shortest unique one of at least `MIN_SHORT` digits, like
git's abbreviations; a prefix of the whole id works too. Stored ids keep their time order.
"""

from __future__ import annotations

import os
import re
import time

TIME_DIGITS = 12
RANDOM_DIGITS = 12
# Shown: at least this many digits of the random part (more where two jobs share them).
MIN_SHORT = 6
# Typed: at least this many hex digits (after an optional `job_`).
MIN_TYPED = 4
_HEX = re.compile(r"[0-9a-f]+")


def new_id(prefix: str) -> str:
    """`prefix_` + 12 hex digits of milliseconds + 12 random hex digits."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"


def id_digits(job_id: str, prefix: str = "job") -> str | None:
    """The 24 hex digits of a well-formed id (time then random), else None."""
    head = f"{prefix}_"
    digits = job_id[len(head) :] if job_id.startswith(head) else ""
    if len(digits) != TIME_DIGITS + RANDOM_DIGITS or not _HEX.fullmatch(digits):
        return None
    return digits


def random_part(job_id: str, prefix: str = "job") -> str | None:
    """The random digits of a well-formed id, else None."""
    digits = id_digits(job_id, prefix)
    return digits[TIME_DIGITS:] if digits is not None else None


def typed_digits(ref: str, prefix: str = "job") -> str | None:
    """The hex digits a person typed for an id (`job_3f9a2c` or `3f9a2c`, any case), or None
    when `ref` is not that shape or too short to look up."""
    text = ref.strip().lower()
    text = text.removeprefix(f"{prefix}_")
    if len(text) < MIN_TYPED or len(text) > TIME_DIGITS + RANDOM_DIGITS:
        return None
    return text if _HEX.fullmatch(text) else None


def shortest_unique(digits: str, others: list[str], minimum: int = MIN_SHORT) -> str:
    """The shortest prefix of `digits` of at least `minimum` characters that no string of
    `others` starts with (all of `digits` when each prefix is shared)."""
    length = minimum
    for other in others:
        if other == digits:
            continue
        common = 0
        for a, b in zip(digits, other, strict=False):
            if a != b:
                break
            common += 1
        length = max(length, common + 1)
    return digits[: min(length, len(digits))]


def looks_like_id(text: str, prefix: str = "job") -> bool:
    """True when `text` could be read as an id or a prefix of one (a name must not be)."""
    bare = text.lower().removeprefix(f"{prefix}_")
    return bool(_HEX.fullmatch(bare)) or text.lower().startswith(f"{prefix}_")
