"""Streaming output generation: one pass over the input, constant memory, orjson throughout."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from jobqueue.emulator.responses import Shared, answerer, fast_line_maker
from jobqueue.emulator.validation import READ_BUFFER

WRITE_BUFFER = 1 << 20
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
    embedding_dimensions: int


@dataclass
class OutputResult:
    completed: int = 0
    failed: int = 0
    output_bytes: int = 0
    error_bytes: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


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


def generate(plan: OutputPlan) -> OutputResult:
    """Write the output and error files of a run; the hot loop of a million-line batch."""
    result = OutputResult()
    stem = plan.batch_id.removeprefix("batch_")
    dumps, loads, opts = orjson.dumps, orjson.loads, _DUMPS_OPTS
    shared = Shared(
        created=plan.created, model=plan.model, embedding_dimensions=plan.embedding_dimensions
    )
    answer = answerer(plan.endpoint, shared)
    make_line = fast_line_maker(plan.endpoint, shared)
    finished, rate, seed, batch_id = plan.finished, plan.failure_rate, plan.seed, plan.batch_id
    unfinished_error = None
    if plan.unfinished_code is not None:
        unfinished_error = {
            "code": plan.unfinished_code,
            "message": UNFINISHED_MESSAGES.get(plan.unfinished_code, plan.unfinished_code),
        }
    completed = failed = in_total = out_total = 0
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
                    tokens = max(1, len(raw) // 4)  # estimate_tokens, inlined
                    if make_line is not None:
                        data, out_tokens = make_line(obj["body"], ident, tokens, custom_id)
                        out_write(data)
                        completed += 1
                        in_total += tokens
                        out_total += out_tokens
                        continue
                    body, out_tokens = answer(obj["body"], ident, tokens)
                    line = {
                        "id": f"batch_req_{ident}",
                        "custom_id": custom_id,
                        "response": {
                            "status_code": 200,
                            "request_id": f"req_{ident}",
                            "body": body,
                        },
                        "error": None,
                    }
                    out_write(dumps(line, option=opts))
                    completed += 1
                    in_total += tokens
                    out_total += out_tokens
    finally:
        out.close()
        err.close()
    result.completed, result.failed = completed, failed
    result.input_tokens, result.output_tokens = in_total, out_total
    result.output_bytes, result.error_bytes = out.size, err.size
    return result
