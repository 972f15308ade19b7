"""What a file is, for messages that refuse one (no I/O: it reads a stat mode)."""

from __future__ import annotations

import stat

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """`a directory`, `a FIFO`, `a character device`, … for an `st_mode`."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a special file"
