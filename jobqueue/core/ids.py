"""Identifiers: a prefix, then time-ordered hex, so ids sort by creation time."""

from __future__ import annotations

import os
import time


def new_id(prefix: str) -> str:
    """`prefix_` + 12 hex digits of milliseconds + 12 random hex digits."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"
