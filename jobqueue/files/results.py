"""Result files on disk: scanning a batch's output and error files, and reading lines back.

Pure file work, no database: scanning streams a file a line at a time (a success line without
parsing its body) and says, for each line, which request it answers, its outcome and where it
is (offset, length). Reading back takes request locations in input order (the store's
`result_locations_in_order`) and returns the bytes of their lines, reading each run of lines
that follow each other in one file with a single `pread`.

A location is a tuple (position, custom_id, status_code, error_code, result_batch_number,
result_kind, result_offset, result_length), a request's columns in that order: plain tuples,
not objects, because an export of a million requests handles a million of them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec
import orjson

from jobqueue.core.lifecycle import is_retryable

NEVER_RAN_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "missing_result": "The remote reported no result for this request.",
}


@dataclass(slots=True)
class LineOutcome:
    custom_id: str
    kind: str  # "output" or "error": which file holds the line
    offset: int
    length: int
    succeeded: bool
    status_code: int | None
    error_code: str | None

    @property
    def retryable(self) -> bool:
        return not self.succeeded and is_retryable(self.status_code, self.error_code)


def classify(line: dict[str, Any]) -> tuple[bool, int | None, str | None]:
    """(succeeded, status_code, error_code) of one output or error line."""
    response = line.get("response") or None
    error = line.get("error") or None
    status_code = response.get("status_code") if isinstance(response, dict) else None
    if error:
        code = error.get("code") if isinstance(error, dict) else None
        return False, status_code, code or "error"
    if status_code is not None and 200 <= status_code < 300:
        return True, status_code, None
    code = None
    body = response.get("body") if isinstance(response, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code") or body["error"].get("type")
    if code is None:
        code = f"http_{status_code}" if status_code is not None else "no_response"
    return False, status_code, code


# The fast path of scanning: a line of the usual success shape is decoded into these structs,
# which read `custom_id`, `response.status_code` and `error` and skip everything else (the
# response body: an embedding's floats are most of a line and most of `orjson.loads`' time)
# while still checking that the whole line is well-formed JSON. Anything else (a missing key,
# another type, a non-2xx status, a non-null error) fails to decode and the line is parsed in
# full and classified by `classify`, so both paths give the same outcome.
class _FastResponse(msgspec.Struct):
    status_code: int


class _FastLine(msgspec.Struct):
    custom_id: str
    response: _FastResponse
    error: None = None


# The same with the body's `usage` read too (its other keys still skipped): the counts of chat
# completions and completions (`prompt_tokens`, `completion_tokens`, `*_details`), of the
# Responses API (`input_tokens`, `output_tokens`, `*_details`) and of embeddings
# (`prompt_tokens`). A count of another type (a float, a string, null) fails the fast path.
# Absent counts are 0, and the two APIs' names are added (a body has one set or the other), so
# reading them is a few additions.
class _FastDetails(msgspec.Struct, gc=False):
    cached_tokens: int = 0
    reasoning_tokens: int = 0


class _FastUsage(msgspec.Struct, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    prompt_tokens_details: _FastDetails | None = None
    completion_tokens_details: _FastDetails | None = None
    input_tokens_details: _FastDetails | None = None
    output_tokens_details: _FastDetails | None = None


class _FastBody(msgspec.Struct, gc=False):
    usage: _FastUsage | None = None


class _FastUsageResponse(msgspec.Struct, gc=False):
    status_code: int
    body: _FastBody | None = None


class _FastUsageLine(msgspec.Struct, gc=False):
    custom_id: str
    response: _FastUsageResponse
    error: None = None


_decode_fast = msgspec.json.Decoder(_FastLine).decode
_decode_fast_usage = msgspec.json.Decoder(_FastUsageLine).decode
_FAST_ERRORS = (msgspec.DecodeError, UnicodeDecodeError)

# (input, cached input, output, reasoning) tokens of one response; None when it had no `usage`.
Tokens = tuple[int, int, int, int]
TOKEN_KINDS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")


def _tokens_of_struct(u: _FastUsage) -> Tokens:
    p, i = u.prompt_tokens_details, u.input_tokens_details
    c, o = u.completion_tokens_details, u.output_tokens_details
    return (
        u.prompt_tokens + u.input_tokens,
        (p.cached_tokens if p is not None else 0) + (i.cached_tokens if i is not None else 0),
        u.completion_tokens + u.output_tokens,
        (c.reasoning_tokens if c is not None else 0) + (o.reasoning_tokens if o is not None else 0),
    )


def _count(d: Any, key: str) -> int:
    value = d.get(key) if isinstance(d, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def tokens_of(body: Any) -> Tokens | None:
    """(input, cached input, output, reasoning) tokens of a parsed response body's `usage`
    (chat completions, completions, responses, embeddings); None when it has none. A count
    that is missing or not an integer counts 0; the names of both APIs are added (`prompt_tokens`
    + `input_tokens`, and so on: a body has one set or the other)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    return (
        _count(usage, "prompt_tokens") + _count(usage, "input_tokens"),
        _count(usage.get("prompt_tokens_details"), "cached_tokens")
        + _count(usage.get("input_tokens_details"), "cached_tokens"),
        _count(usage, "completion_tokens") + _count(usage, "output_tokens"),
        _count(usage.get("completion_tokens_details"), "reasoning_tokens")
        + _count(usage.get("output_tokens_details"), "reasoning_tokens"),
    )


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """The line as a dict, if it is a JSON object with a string `custom_id`."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
        return line
    return None


def scan_line(raw: bytes) -> tuple[str, bool, int | None, str | None] | None:
    """(custom_id, succeeded, status_code, error_code) of one stripped line; None if the line
    is not a JSON object with a string `custom_id` (such lines are skipped).

    Equal to `orjson.loads` + `classify`, but about four times cheaper on success lines. One
    known difference, for lines no real remote writes: a number beyond the double range inside
    the skipped body (`1e400`) makes orjson reject the line and the fast path accept it.
    """
    try:
        # msgspec does not check the UTF-8 of skipped strings: non-ASCII lines are checked first
        # (strictly, surrogates refused, like orjson).
        if not raw.isascii():
            raw.decode()
        fast = _decode_fast(raw)
    except _FAST_ERRORS:
        pass
    else:
        status = fast.response.status_code
        if 200 <= status < 300:
            return fast.custom_id, True, status, None
    line = _parse_line(raw)
    return None if line is None else (line["custom_id"], *classify(line))


def scan_line_tokens(
    raw: bytes,
) -> tuple[str, bool, int | None, str | None, Tokens | None] | None:
    """`scan_line` plus the tokens of the response body's `usage` (`tokens_of`), read in the
    same decode: the fast path reads `usage` and still skips the rest of the body."""
    try:
        if not raw.isascii():
            raw.decode()
        fast = _decode_fast_usage(raw)
    except _FAST_ERRORS:
        pass
    else:
        response = fast.response
        status = response.status_code
        if 200 <= status < 300:
            fast_body = response.body
            usage = fast_body.usage if fast_body is not None else None
            used = _tokens_of_struct(usage) if usage is not None else None
            return fast.custom_id, True, status, None, used
    line = _parse_line(raw)
    if line is None:
        return None
    parsed = line.get("response")
    body = parsed.get("body") if isinstance(parsed, dict) else None
    return (line["custom_id"], *classify(line), tokens_of(body))


def _scan(
    path: Path, scan: Callable[[bytes], tuple[Any, ...] | None] | None = None
) -> Iterator[tuple[Any, ...]]:
    """What `scan` (default `scan_line`: custom_id, succeeded, status_code, error_code) finds
    on every line, with the line's offset and length appended."""
    scan = scan or scan_line
    offset = 0
    with path.open("rb", buffering=1 << 20) as f:
        for raw in f:
            length = len(raw)
            stripped = raw.strip()
            if stripped:
                found = scan(stripped)
                if found is not None:
                    yield (*found, offset, length)
            offset += length


def scan_result_file(path: Path, kind: str) -> Iterator[LineOutcome]:
    """Every line's outcome and place in the file, streaming."""
    for custom_id, succeeded, status_code, error_code, offset, length in _scan(path):
        yield LineOutcome(custom_id, kind, offset, length, succeeded, status_code, error_code)


def outcome_rows(
    files: list[tuple[str, Path]], can_retry: bool, *, tokens: bool = True
) -> Iterator[tuple[str | None, int | None, str | None, str, int, int, str, Tokens | None]]:
    """(outcome, status_code, error_code, kind, offset, length, custom_id, tokens) of every line
    of the files, in their order: a retryable failure is pending (outcome None) if `can_retry`.
    `tokens` (the response's usage, see `tokens_of`) is None for a line without usage, and for
    every line when `tokens` is False (the scan then skips the whole body)."""
    for kind, path in files:
        if tokens:
            lines: Iterable[tuple[Any, ...]] = _scan(path, scan_line_tokens)
        else:
            lines = ((*found[:4], None, *found[4:]) for found in _scan(path))
        for custom_id, succeeded, status_code, error_code, used, offset, length in lines:
            if succeeded:
                outcome: str | None = "succeeded"
            elif can_retry and is_retryable(status_code, error_code):
                outcome = None
            else:
                outcome = "failed"
            yield outcome, status_code, error_code, kind, offset, length, custom_id, used


# -- reading lines back -----------------------------------------------------------------------


class _FileCache:
    """A few open result files, least recently used closed first."""

    def __init__(self, size: int = 64) -> None:
        self._files: OrderedDict[str, IO[bytes]] = OrderedDict()
        self._size = size
        self._buffer = bytearray(_RUN_BYTES)

    def _file(self, path: str) -> IO[bytes]:
        f = self._files.get(path)
        if f is None:
            f = open(path, "rb")  # noqa: SIM115 - kept open across calls, closed by close()
            self._files[path] = f
            if len(self._files) > self._size:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(path)
        return f

    def read(self, path: str, offset: int, length: int) -> bytes:
        return os.pread(self._file(path).fileno(), length, offset)

    def read_into(self, path: str, offset: int, length: int) -> tuple[bytearray, int]:
        """A buffer reused by the next call (no allocation a run) holding the bytes from its
        start, and how many it holds."""
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        got = os.preadv(self._file(path).fileno(), [memoryview(self._buffer)[:length]], offset)
        return self._buffer, got

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def never_ran_line(custom_id: str, code: str | None, status_code: int | None) -> bytes:
    """The line of a request with no line of its own: an error in the batch line shape."""
    code = code or "batch_cancelled"
    return orjson.dumps(
        {
            "id": None,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": NEVER_RAN_MESSAGES.get(code, code)},
        }
    )


_RUN_BYTES = 1 << 20  # the most one read of consecutive lines takes
_WRITE_BYTES = 1 << 20  # export writes


def _spans(
    pages: Iterable[list[tuple[Any, ...]]], result_paths: dict[int, dict[str, str]]
) -> Iterator[tuple[list[tuple[Any, ...]], str | None, int, int]]:
    """(locations, path, start, end) in the order of `pages` (lists of location tuples): one
    request that has no line (path None), or a run of requests whose lines follow each other in
    one file, from byte `start` to `end` (at most `_RUN_BYTES` but for a longer single line)."""
    for rows in pages:
        n = len(rows)
        i = 0
        while i < n:
            row = rows[i]
            # Literal indexes (see the location tuple above): this loop runs once a request.
            batch, kind, offset, length = row[4], row[5], row[6], row[7]
            path = None
            if batch is not None:
                path = result_paths.get(batch, {}).get(kind)
            if path is None:
                yield [row], None, 0, 0
                i += 1
                continue
            j, end = i + 1, offset + length
            while j < n and end - offset < _RUN_BYTES:
                nxt = rows[j]
                if nxt[6] != end or nxt[4] != batch or nxt[5] != kind:
                    break
                end += nxt[7]
                j += 1
            yield rows[i:j], path, offset, end
            i = j


def read_runs(
    pages: Iterable[list[tuple[Any, ...]]], result_paths: dict[int, dict[str, str]]
) -> Iterator[tuple[list[tuple[Any, ...]], bytes | None]]:
    """(locations, data) in the order of `pages` (lists of location tuples): one request that
    has no line (data None), or a run of requests whose lines follow each other in one file,
    with the bytes of those lines.

    `result_paths` maps batch number -> {"output": path, "error": path}. A run (the usual case:
    a batch's output is in input order) is read in one slice of up to 1 MiB instead of one
    read per line.
    """
    cache = _FileCache()
    try:
        for run, path, start, end in _spans(pages, result_paths):
            yield run, None if path is None else cache.read(path, start, end - start)
    finally:
        cache.close()


def run_lines(run: list[tuple[Any, ...]], data: bytes | None) -> Iterator[bytes]:
    """The run's lines without their line ends (a synthetic line for a request without one)."""
    if data is None:
        row = run[0]
        yield never_ran_line(row[1], row[3], row[2])
        return
    at = 0
    for row in run:
        length = row[7]
        yield data[at : at + length].rstrip(b"\r\n")
        at += length


def write_runs(
    pages: Iterable[list[tuple[Any, ...]]], result_paths: dict[int, dict[str, str]], out: IO[bytes]
) -> int:
    """Write the lines of the requests of `pages` (as `read_runs` reads them) as JSONL, each
    line ending in one newline, to `out`; return the number of lines.

    A run of lines that already are in that form is written as read, from one buffer reused
    for every run, without splitting it into lines or copying it. Each of a run's lines was
    cut at a newline when it was scanned, so the run is in that form when it ends in a newline
    (only a file's last line may not) and holds no carriage return.
    """
    cache = _FileCache()
    written = 0
    pending: list[bytes] = []
    size = 0
    try:
        for run, path, start, end in _spans(pages, result_paths):
            written += len(run)
            if path is not None:
                buffer, n = cache.read_into(path, start, end - start)
                if n and buffer[n - 1] == 0x0A and buffer.find(b"\r", 0, n) < 0:
                    if pending:
                        out.write(b"".join(pending))
                        pending.clear()
                        size = 0
                    out.write(memoryview(buffer)[:n])
                    continue
                lines = run_lines(run, bytes(buffer[:n]))
            else:
                lines = run_lines(run, None)
            for line in lines:
                pending.append(line)
                pending.append(b"\n")
                size += len(line) + 1
            if size >= _WRITE_BYTES:
                out.write(b"".join(pending))
                pending.clear()
                size = 0
        if pending:
            out.write(b"".join(pending))
    finally:
        cache.close()
    return written
