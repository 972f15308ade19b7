"""Streaming output generation: one pass over the input, constant memory, orjson throughout.

With `shuffle`, lines come out of input order, as the remote does not promise any: each file is
written in chunks of up to SHUFFLE_CHUNK_LINES lines (or SHUFFLE_CHUNK_BYTES), each chunk
shuffled, and the chunks then put in a shuffled order, so that any line may land anywhere
while memory stays bounded by one chunk. The order depends only on the seed and the input.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from jobqueue.emulator.responses import (
    CACHE_MIN_TOKENS,
    Shared,
    answerer,
    cached_tokens,
    fast_line_maker,
)
from jobqueue.emulator.validation import READ_BUFFER
from jobqueue.tokens import input_tokens

WRITE_BUFFER = 1 << 20
SHUFFLE_CHUNK_LINES = 4096
SHUFFLE_CHUNK_BYTES = 8 << 20
_DUMPS_OPTS = orjson.OPT_APPEND_NEWLINE

UNFINISHED_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}

SERVER_ERROR_BODY = {
    "error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


@dataclass
class OutputPlan:
    input_path: Path
    output_path: Path
    error_path: Path
    endpoint: str
    batch_id: str
    model: str | None
    created: int
    finished: int  # the first `finished` requests ran; the rest get `unfinished_code`
    unfinished_code: str | None
    failure_rate: float
    seed: int
    embedding_dimensions: int | None = None  # None: each model's own size
    # Input tokens per request in file order (from validation); None: counted here.
    line_tokens: array[int] | None = None
    shuffle: bool = False


@dataclass
class OutputResult:
    completed: int = 0
    failed: int = 0
    output_bytes: int = 0
    error_bytes: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0


def request_fails(seed: int, batch_id: str, custom_id: str, rate: float) -> bool:
    """Whether this request of this batch is one of the `rate` share that fail with a 500."""
    if rate <= 0:
        return False
    # A real hash, not CRC32: CRC is affine in its input, so with two batch ids the failing
    # sets of the same custom ids came out equal or complementary (a retry at rate 0.5 then
    # failed all or nothing).
    digest = hashlib.blake2b(f"{seed}:{batch_id}:{custom_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 18446744073709551616.0 < rate


class _LazyFile:
    """Opened on the first write: most batches have no error file, and creating a file is the
    dearest part of a small batch's output."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: Any = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._f is None:
            self._f = open(self.path, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115
        self._f.write(data)
        self.size += len(data)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class _ShuffledFile(_LazyFile):
    """Lines shuffled a chunk at a time, then the chunks put in a shuffled order on close."""

    def __init__(self, path: Path, rng: random.Random) -> None:
        super().__init__(path)
        self._rng = rng
        self._lines: list[bytes] = []
        self._pending = 0
        self._chunks: list[tuple[int, int]] = []  # (offset, size) in the file as written

    def write(self, data: bytes) -> None:
        self._lines.append(data)
        self._pending += len(data)
        if len(self._lines) >= SHUFFLE_CHUNK_LINES or self._pending >= SHUFFLE_CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._lines:
            return
        self._rng.shuffle(self._lines)
        self._chunks.append((self.size, self._pending))
        super().write(b"".join(self._lines))
        self._lines, self._pending = [], 0

    def close(self) -> None:
        self._flush()
        super().close()
        if len(self._chunks) < 2:
            return
        order = list(self._chunks)
        self._rng.shuffle(order)
        mixed = self.path.with_name(self.path.name + ".mix")
        try:
            with open(self.path, "rb") as src, open(mixed, "wb", buffering=WRITE_BUFFER) as dst:
                for offset, size in order:
                    src.seek(offset)
                    dst.write(src.read(size))
            os.replace(mixed, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                mixed.unlink()


def generate(plan: OutputPlan) -> OutputResult:
    """Write the output and error files of a run; the hot loop of a million-line batch."""
    result = OutputResult()
    stem = plan.batch_id.removeprefix("batch_")
    dumps, loads, opts = orjson.dumps, orjson.loads, _DUMPS_OPTS
    shared = Shared(
        created=plan.created, model=plan.model, embedding_dimensions=plan.embedding_dimensions
    )
    endpoint, encoding = plan.endpoint, shared.encoding
    answer = answerer(endpoint, shared)
    make_line = fast_line_maker(endpoint, shared)
    finished, rate, seed, batch_id = plan.finished, plan.failure_rate, plan.seed, plan.batch_id
    line_tokens = plan.line_tokens
    seen_prefixes: set[int] = set()
    unfinished_error = None
    if plan.unfinished_code is not None:
        unfinished_error = {
            "code": plan.unfinished_code,
            "message": UNFINISHED_MESSAGES.get(plan.unfinished_code, plan.unfinished_code),
        }
    completed = failed = in_total = cached_total = out_total = reasoning_total = 0
    out: _LazyFile
    err: _LazyFile
    if plan.shuffle:
        # String seeds are hashed with SHA-512: the same order in every process.
        out = _ShuffledFile(plan.output_path, random.Random(f"{seed}:output"))
        err = _ShuffledFile(plan.error_path, random.Random(f"{seed}:error"))
    else:
        out, err = _LazyFile(plan.output_path), _LazyFile(plan.error_path)
    out_write, err_write = out.write, err.write
    try:
        with open(plan.input_path, "rb", buffering=READ_BUFFER) as f:
            index = -1
            for raw in f:
                if raw.isspace():
                    continue  # skipped by validation too
                index += 1
                obj = loads(raw)
                custom_id = obj["custom_id"]
                ident = f"{stem}{index:08x}"
                if index >= finished:
                    line: dict[str, Any] = {
                        "id": f"batch_req_{ident}",
                        "custom_id": custom_id,
                        "response": None,
                        "error": unfinished_error,
                    }
                    err_write(dumps(line, option=opts))
                    failed += 1
                elif rate > 0 and request_fails(seed, batch_id, custom_id, rate):
                    line = {
                        "id": f"batch_req_{ident}",
                        "custom_id": custom_id,
                        "response": {
                            "status_code": 500,
                            "request_id": f"req_{ident}",
                            "body": SERVER_ERROR_BODY,
                        },
                        "error": None,
                    }
                    err_write(dumps(line, option=opts))
                    failed += 1
                else:
                    body = obj["body"]
                    if line_tokens is not None:
                        tokens = line_tokens[index]
                    else:
                        tokens = input_tokens(endpoint, body, encoding=encoding)
                    cached = 0
                    if tokens >= CACHE_MIN_TOKENS:
                        cached = cached_tokens(endpoint, body, tokens, seen_prefixes, encoding)
                    completed += 1
                    in_total += tokens
                    cached_total += cached
                    if make_line is not None:
                        data, out_tokens, reasoning = make_line(
                            body, ident, tokens, cached, custom_id
                        )
                        out_write(data)
                        out_total += out_tokens
                        reasoning_total += reasoning
                        continue
                    response, out_tokens, reasoning = answer(body, ident, tokens, cached)
                    line = {
                        "id": f"batch_req_{ident}",
                        "custom_id": custom_id,
                        "response": {
                            "status_code": 200,
                            "request_id": f"req_{ident}",
                            "body": response,
                        },
                        "error": None,
                    }
                    out_write(dumps(line, option=opts))
                    out_total += out_tokens
                    reasoning_total += reasoning
    finally:
        out.close()
        err.close()
    result.completed, result.failed = completed, failed
    result.input_tokens, result.cached_tokens = in_total, cached_total
    result.output_tokens, result.reasoning_tokens = out_total, reasoning_total
    result.output_bytes, result.error_bytes = out.size, err.size
    return result
