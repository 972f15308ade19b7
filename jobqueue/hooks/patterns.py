"""Event-type patterns for hooks: `*`, `job.*`, `batch.completed`, or any fnmatch-style glob."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

__all__ = ["matches"]


def _one(pattern: str, event_type: str) -> bool:
    pattern = pattern.strip()
    if not pattern:
        return False
    if pattern == "*" or pattern == event_type:
        return True
    # `job.*` is a prefix family; fnmatchcase covers it and `batch.*ed`, `job.[cf]*`, `?` too.
    # Case-sensitive on purpose: event types are lower-case identifiers on every platform.
    return fnmatchcase(event_type, pattern)


def matches(patterns: str | Iterable[str], event_type: str) -> bool:
    """True if `event_type` matches the pattern, or any pattern of a list (an empty list: none)."""
    if isinstance(patterns, str):
        return _one(patterns, event_type)
    return any(_one(pattern, event_type) for pattern in patterns)
