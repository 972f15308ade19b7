"""Streaming output generation: one pass over the input, constant memory, orjson throughout."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import orjson

from jobqueue.emulator.responses import Context, build, estimate_tokens
from jobqueue.emulator.validation import iter_lines

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
    digest = zlib.crc32(f"{seed}:{batch_id}:{custom_id}".encode())
    return digest / 4294967296.0 < rate


def generate(plan: OutputPlan) -> OutputResult:
    result = OutputResult()
    stem = plan.batch_id.removeprefix("batch_")
    dumps = orjson.dumps
    loads = orjson.loads
    endpoint = plan.endpoint
    unfinished_error = None
    if plan.unfinished_code is not None:
        unfinished_error = {
            "code": plan.unfinished_code,
            "message": UNFINISHED_MESSAGES.get(plan.unfinished_code, plan.unfinished_code),
        }
    with (
        open(plan.output_path, "wb", buffering=WRITE_BUFFER) as out,
        open(plan.error_path, "wb", buffering=WRITE_BUFFER) as err,
    ):
        for index, (_number, raw) in enumerate(iter_lines(plan.input_path)):
            obj = loads(raw)
            custom_id = obj["custom_id"]
            ident = f"{stem}{index:08x}"
            line_id = f"batch_req_{ident}"
            if index >= plan.finished:
                err.write(
                    dumps(
                        {
                            "id": line_id,
                            "custom_id": custom_id,
                            "response": None,
                            "error": unfinished_error,
                        },
                        option=_DUMPS_OPTS,
                    )
                )
                result.failed += 1
                continue
            if request_fails(plan.seed, plan.batch_id, custom_id, plan.failure_rate):
                err.write(
                    dumps(
                        {
                            "id": line_id,
                            "custom_id": custom_id,
                            "response": {
                                "status_code": 500,
                                "request_id": f"req_{ident}",
                                "body": SERVER_ERROR_BODY,
                            },
                            "error": None,
                        },
                        option=_DUMPS_OPTS,
                    )
                )
                result.failed += 1
                continue
            in_tokens = estimate_tokens(raw)
            ctx = Context(
                created=plan.created,
                model=plan.model,
                ident=ident,
                input_tokens=in_tokens,
                embedding_dimensions=plan.embedding_dimensions,
            )
            body, out_tokens = build(endpoint, obj["body"], ctx)
            out.write(
                dumps(
                    {
                        "id": line_id,
                        "custom_id": custom_id,
                        "response": {
                            "status_code": 200,
                            "request_id": f"req_{ident}",
                            "body": body,
                        },
                        "error": None,
                    },
                    option=_DUMPS_OPTS,
                )
            )
            result.completed += 1
            result.input_tokens += in_tokens
            result.output_tokens += out_tokens
        result.output_bytes = out.tell()
        result.error_bytes = err.tell()
    return result
