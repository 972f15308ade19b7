"""Streaming validation of a batch input file, as the remote does it before running a batch."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from jobqueue.emulator.responses import MODEL_OPTIONAL
from jobqueue.tokens import encoding_for_model, input_tokens

# The remote lists several problems at once but not every one of a broken million-line file.
MAX_REPORTED_ERRORS = 100
READ_BUFFER = 1 << 20


@dataclass
class Validation:
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    model: str | None = None
    tokens: int = 0
    # Input tokens of each request in file order, kept for the output's usage (4 bytes each).
    line_tokens: array[int] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def error(code: str, message: str, param: str | None = None, line: int | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def iter_lines(path: Path) -> Any:
    """(line number from 1, raw bytes) for every non-blank line; blank lines are skipped."""
    with open(path, "rb", buffering=READ_BUFFER) as f:
        for number, raw in enumerate(f, 1):
            if not raw.isspace():
                yield number, raw


def validate_input(
    path: Path, endpoint: str, *, size: int, max_requests: int, max_bytes: int
) -> Validation:
    result = Validation()
    errors = result.errors
    if size > max_bytes:
        errors.append(
            error(
                "file_too_large",
                f"The input file is {size} bytes, over the limit of {max_bytes} bytes.",
                "input_file_id",
            )
        )
        return result
    seen: set[int] = set()  # hashes, not strings: a million ids stay small
    model: str | None = None
    tokens = 0
    total = 0
    line_tokens: array[int] = array("I")
    append = line_tokens.append
    encoding: str | None = None
    for number, raw in iter_lines(path):
        total += 1
        if total > max_requests:
            errors.append(
                error(
                    "too_many_tasks",
                    f"The batch input file contains more than the maximum of {max_requests} "
                    "requests.",
                )
            )
            break
        body, problem = _parse_line(raw, number, endpoint, seen)
        if problem is None:
            line_model = body.get("model")
            if model is None:
                model = line_model
            elif line_model is not None and line_model != model:
                problem = error(
                    "model_mismatch",
                    f"The model '{line_model}' of this request does not match the model "
                    f"'{model}' of the other requests in the batch. A batch may use one model.",
                    "body.model",
                    number,
                )
        if problem is not None:
            errors.append(problem)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            continue
        if encoding is None:
            encoding = encoding_for_model(model)  # one model a batch: one encoding
        estimate = input_tokens(endpoint, body, encoding=encoding)
        tokens += estimate
        append(estimate)
    if total == 0 and not errors:
        errors.append(error("empty_file", "The batch input file is empty."))
    result.total = total
    result.model = model
    result.tokens = tokens
    result.line_tokens = line_tokens if result.ok else None
    return result


def _check_line(raw: bytes, number: int, endpoint: str, seen: set[int]) -> tuple[dict | None, dict]:
    """(the line's problem or None, its body)."""
    body, problem = _parse_line(raw, number, endpoint, seen)
    return problem, body


def _parse_line(raw: bytes, number: int, endpoint: str, seen: set[int]) -> tuple[dict, dict | None]:
    """(the line's body, its problem or None)."""
    none: dict = {}
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return none, error(
            "invalid_json_line", "This line is not parseable as valid JSON.", None, number
        )
    if not isinstance(obj, dict):
        return none, error("invalid_json_line", "This line is not a JSON object.", None, number)
    for param in ("custom_id", "method", "url", "body"):
        if obj.get(param) is None:
            return none, error(
                "missing_required_parameter",
                f"Missing required parameter: '{param}'.",
                param,
                number,
            )
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return none, error(
            "invalid_request", "custom_id must be a non-empty string.", "custom_id", number
        )
    if obj["method"] != "POST":
        return none, error(
            "invalid_request", "Only the POST method is supported.", "method", number
        )
    if obj["url"] != endpoint:
        return none, error(
            "invalid_url",
            f"The URL provided for this request does not match the batch endpoint ({endpoint}).",
            "url",
            number,
        )
    body = obj["body"]
    if not isinstance(body, dict):
        return none, error("invalid_request", "The body must be a JSON object.", "body", number)
    if body.get("stream"):
        return none, error(
            "streaming_unsupported", "Streaming is not supported in batches.", "body.stream", number
        )
    if endpoint not in MODEL_OPTIONAL and not body.get("model"):
        return none, error(
            "missing_required_parameter",
            "Missing required parameter: 'body.model'.",
            "body.model",
            number,
        )
    key = hash(custom_id)
    if key in seen:
        return none, error(
            "duplicate_custom_id",
            f"The custom_id '{custom_id}' is a duplicate of another request. The custom_id "
            "parameter must be unique for each request in a batch.",
            "custom_id",
            number,
        )
    seen.add(key)
    return body, None
