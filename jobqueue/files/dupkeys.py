"""Repeated keys in request lines: `{"custom_id": "a", "custom_id": "b", …}` is refused.

JSON leaves a repeated key to the parser: orjson (jobqueue's) keeps the last value, others keep
the first, so the remote could key a request "a" while jobqueue tracks it as "b". A line with an
object (at any depth) that holds a key twice is therefore refused, with the key and the line.

orjson cannot tell; jiter can (`catch_duplicate_keys`), at about a quarter of the whole per-line
cost of validation. So that validation stays as fast as it was, a large file is scanned by a
child process while the caller validates it (`DuplicateKeyScan`: one more core busy, no more
wall time); a small file, or a file whose child failed, is scanned in process afterwards
(`scan_file`). Either way the lines are numbered as `iter_lines` numbers them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import jiter
import orjson

__all__ = ["DuplicateKeyScan", "duplicate_key_problem", "iter_lines", "scan_file"]

READ_BUFFER = 1 << 20
# Files at least this large are scanned by a child process (starting one costs ~50 ms).
PARALLEL_MIN_BYTES = 16 * 1024 * 1024  # and only with a spare CPU


def _strict_parser() -> Callable[[bytes], object]:
    """jiter's parse that refuses repeated keys, caching keys only (the fastest, here)."""
    try:
        jiter.from_json(b"{}", catch_duplicate_keys=True, cache_mode="keys")
    except TypeError:  # a jiter before `cache_mode`
        return functools.partial(jiter.from_json, catch_duplicate_keys=True)
    return functools.partial(jiter.from_json, catch_duplicate_keys=True, cache_mode="keys")


_parse = _strict_parser()
_JITER_DUPLICATE = re.compile(r'duplicate key "(.*)" at line \d+ column (\d+)\Z', re.S | re.I)


def spare_cpu() -> bool:
    """Whether this process may use more than one CPU (else a child would only compete)."""
    try:
        return len(os.sched_getaffinity(0)) > 1
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) > 1


def iter_lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield (1-based line number, line ending in "\\n") for each non-blank line; None for a line
    over `limit`. Mirrors the reading loop of `inputs._prepare`, inlined there for speed.
    """
    readline = f.readline
    lineno = 0
    while True:
        raw = readline(limit)
        if not raw:
            return
        lineno += 1
        if raw[-1] != 10:
            if len(raw) >= limit:
                while raw and raw[-1] != 10:
                    raw = readline(READ_BUFFER)
                yield lineno, None
                continue
            raw += b"\n"
        if raw.isspace():
            continue
        yield lineno, raw


def _clip(key: str) -> str:
    text = orjson.dumps(key).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def duplicate_key_problem(raw: bytes) -> str | None:
    """`duplicate key "k" (column N)` when an object of the line holds a key twice, else None
    (a line that is not JSON is left to the validator, which names what is wrong with it)."""
    try:
        _parse(raw)
    except ValueError as exc:
        text = str(exc)
        if "duplicate key" not in text.lower():
            return None
        found = _JITER_DUPLICATE.search(text)
        if found is None:  # another jiter's wording: say it plainly
            return "duplicate key"
        return f"duplicate key {_clip(found.group(1))} (column {found.group(2)})"
    except RecursionError:  # pragma: no cover - jiter bounds its own depth
        return None
    return None


def scan_file(f: BinaryIO, limit: int, keep: int) -> tuple[list[tuple[int, str]], int]:
    """The first `keep` (line, problem) pairs of repeated keys in `f` (read from its start) and
    how many lines have one. Lines are numbered as `iter_lines` numbers them; a line of `limit`
    bytes or more is skipped (the validator refuses it). Reads in blocks, split in C: this runs
    beside the validator and must not fall behind it."""
    f.seek(0)
    kept: list[tuple[int, str]] = []
    total = 0
    lineno = 0
    carry: list[bytes] = []  # the start of a line that continues in the next block
    carried = 0
    overlong = False
    parse = _parse

    def check(raw: bytes) -> None:
        nonlocal total
        try:
            parse(raw)
        except ValueError:
            problem = duplicate_key_problem(raw)
            if problem is not None:
                total += 1
                if len(kept) < keep:
                    kept.append((lineno, problem))

    while block := f.read(READ_BUFFER):
        lines = block.split(b"\n")
        tail = lines.pop()
        if lines and (carry or overlong):
            first = b"".join([*carry, lines[0]])
            if overlong or len(first) >= limit:
                lines[0] = b""  # counted, not checked
            else:
                lines[0] = first
            carry, carried, overlong = [], 0, False
        for raw in lines:  # `check`, inlined: this loop is the child's whole cost
            lineno += 1
            if len(raw) >= limit:
                continue
            try:
                parse(raw)
            except ValueError:
                check(raw)
        if not overlong:
            carry.append(tail)
            carried += len(tail)
            if carried >= limit:
                carry, carried, overlong = [], 0, True
    if (carry and carried) or overlong:
        lineno += 1
        if not overlong:
            check(b"".join(carry))
    return kept, total


_CHILD = (
    "import sys, json; a = json.loads(sys.argv[1]); sys.path[:0] = a['path']; "
    "from jobqueue.files.dupkeys import _child; _child(a)"
)


class DuplicateKeyScan:
    """`scan_file` over `source` in a child process, started now; `result()` waits for it.

    The child opens the file without blocking and checks it is the very file the caller holds
    (device and inode), so a file swapped for a FIFO cannot hang it. `result()` is None when
    the child could not do the work (the caller then scans in process); `cancel()` ends it.
    """

    def __init__(self, source: Path, identity: os.stat_result, limit: int, keep: int) -> None:
        args = {
            "path": [p for p in sys.path if p],
            "source": os.fsdecode(os.path.abspath(source)),
            "dev": identity.st_dev,
            "ino": identity.st_ino,
            "limit": limit,
            "keep": keep,
        }
        self._proc: subprocess.Popen[bytes] | None
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, orjson.dumps(args).decode()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,  # a Ctrl-C at the terminal is the parent's to handle
            )
        except OSError:
            self._proc = None

    def result(self) -> tuple[list[tuple[int, str]], int] | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            out, _ = proc.communicate()
        finally:
            self._proc = None
        if proc.returncode != 0:
            return None
        try:
            report = orjson.loads(out)
            kept = [(int(line), str(message)) for line, message in report["kept"]]
            return kept, int(report["total"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def cancel(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


def _child(args: dict[str, Any]) -> None:
    """The child's work: scan the file the parent named, print the report as JSON."""
    source = str(args["source"])
    fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (args["dev"], args["ino"]):
        os.close(fd)
        sys.exit(3)
    with os.fdopen(fd, "rb", buffering=READ_BUFFER) as f:
        kept, total = scan_file(f, int(args["limit"]), int(args["keep"]))
    sys.stdout.buffer.write(orjson.dumps({"kept": kept, "total": total}))
    sys.stdout.flush()
