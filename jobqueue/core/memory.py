"""Keeping a long-running daemon's resident memory near what it uses (glibc only).

Collecting a batch builds and drops tens of megabytes of small objects (a position for each
of its requests), in whichever duty thread runs it. glibc gives each thread an arena of its
own (up to eight per core) and returns freed memory to the system only from the top of each
heap, so after a few batches the daemon holds its peak in every arena at once: measured on
the 1M-request job (benchmarks/endtoend.py), 264 to 288 MB instead of about 200. `limit_arenas`
caps the arenas at two (as `MALLOC_ARENA_MAX=2` would, unless that is set), and `trim` hands
the free pages of every arena back; elsewhere (another libc, another system) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import cache
from typing import Any

_M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h
_ARENAS = 2


@cache
def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def limit_arenas() -> bool:
    """Cap glibc's malloc arenas (before the threads that would each get one start); False
    when not glibc, or when the environment set `MALLOC_ARENA_MAX` itself."""
    libc = _glibc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, _ARENAS))


def trim() -> None:
    """Give the free memory of every malloc arena back to the system (a few ms)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
