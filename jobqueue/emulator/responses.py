"""Deterministic synthetic response bodies, one builder per batch endpoint.

The same request body always gives the same answer (ids and `created` aside), so tests can
assert on content. Builders are on the hot path of output generation (a million lines), so
they stay plain dict building with no per-line hashing beyond what the body needs.
"""

from __future__ import annotations

import base64
import hashlib
import math
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

SNIPPET_CHARS = 48


@dataclass(frozen=True)
class Shared:
    """What every answer of one batch shares."""

    created: int
    model: str | None
    embedding_dimensions: int


def estimate_tokens(raw_line: bytes | str) -> int:
    """Tokens of an input line, the emulator's one estimate (also used for the token limit)."""
    return max(1, len(raw_line) // 4)


def _text_of(value: Any) -> str:
    """The text of a prompt-like value: a string, a list of parts or messages, or a dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(v) for v in value[-1:]) if value else ""
    if isinstance(value, dict):
        for key in ("content", "text", "input", "prompt"):
            if key in value:
                return _text_of(value[key])
    return "" if value is None else str(value)


def reply_text(prompt: str) -> str:
    snippet = " ".join(prompt[: SNIPPET_CHARS * 4].split())[:SNIPPET_CHARS]
    return f"Emulated reply to: {snippet}"


def _last_message_text(messages: Any) -> str:
    # The common shape first: a list of messages whose last content is a string.
    if isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict):
            content = last.get("content")
            if isinstance(content, str):
                return content
    return _text_of(messages)


def _output_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _chat(body: dict[str, Any], ident: str, tokens: int, ctx: Shared) -> tuple[dict[str, Any], int]:
    text = reply_text(_last_message_text(body.get("messages")))
    out_tokens = _output_tokens(text)
    return {
        "id": f"chatcmpl-{ident}",
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": tokens,
            "completion_tokens": out_tokens,
            "total_tokens": tokens + out_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_emulator",
    }, out_tokens


def _completion(
    body: dict[str, Any], ident: str, tokens: int, ctx: Shared
) -> tuple[dict[str, Any], int]:
    text = reply_text(_text_of(body.get("prompt")))
    out_tokens = _output_tokens(text)
    return {
        "id": f"cmpl-{ident}",
        "object": "text_completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": tokens,
            "completion_tokens": out_tokens,
            "total_tokens": tokens + out_tokens,
        },
        "system_fingerprint": "fp_emulator",
    }, out_tokens


def _responses(
    body: dict[str, Any], ident: str, tokens: int, ctx: Shared
) -> tuple[dict[str, Any], int]:
    text = reply_text(_text_of(body.get("input")))
    out_tokens = _output_tokens(text)
    return {
        "id": f"resp_{ident}",
        "object": "response",
        "created_at": ctx.created,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "model": ctx.model,
        "output": [
            {
                "type": "message",
                "id": f"msg_{ident}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "temperature": body.get("temperature", 1.0),
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "usage": {
            "input_tokens": tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens + out_tokens,
        },
        "metadata": body.get("metadata") or {},
    }, out_tokens


def unit_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text` (SHAKE-256 bytes read as signed 16-bit ints)."""
    raw = array("h", hashlib.shake_256(text.encode()).digest(2 * dimensions))
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def _embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]  # one tokenised input
        return [v if isinstance(v, str) else " ".join(map(str, v)) for v in value]
    return [str(value)]


def _embeddings(
    body: dict[str, Any], ident: str, tokens: int, ctx: Shared
) -> tuple[dict[str, Any], int]:
    dims = body.get("dimensions") or ctx.embedding_dimensions
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(_embedding_inputs(body.get("input"))):
        vector: Any = unit_vector(text, int(dims))
        if as_base64:
            vector = base64.b64encode(array("f", vector).tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": ctx.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, 0


_MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
_CATEGORIES_FALSE = dict.fromkeys(_MODERATION_CATEGORIES, False)
_APPLIED_INPUT_TYPES = {c: ["text"] for c in _MODERATION_CATEGORIES}


def _moderations(
    body: dict[str, Any], ident: str, tokens: int, ctx: Shared
) -> tuple[dict[str, Any], int]:
    raw = body.get("input")
    items = raw if isinstance(raw, list) else [raw]
    results = []
    for item in items:
        # A small deterministic score per category, never over the flagging threshold.
        digest = hashlib.blake2b(
            str(item).encode(), digest_size=len(_MODERATION_CATEGORIES)
        ).digest()
        scores = {c: b / 25600 for c, b in zip(_MODERATION_CATEGORIES, digest, strict=True)}
        results.append(
            {
                "flagged": False,
                "categories": _CATEGORIES_FALSE,
                "category_scores": scores,
                "category_applied_input_types": _APPLIED_INPUT_TYPES,
            }
        )
    return {"id": f"modr-{ident}", "model": ctx.model, "results": results}, 0


def _images(
    body: dict[str, Any], ident: str, tokens: int, ctx: Shared
) -> tuple[dict[str, Any], int]:
    n = int(body.get("n") or 1)
    data = [{"url": f"https://emulator.invalid/images/{ident}-{i}.png"} for i in range(n)]
    return {
        "created": ctx.created,
        "data": data,
        "usage": {
            "input_tokens": tokens,
            "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0},
            "output_tokens": 0,
            "total_tokens": tokens,
        },
    }, 0


def _videos(
    body: dict[str, Any], ident: str, tokens: int, ctx: Shared
) -> tuple[dict[str, Any], int]:
    return {
        "id": f"video_{ident}",
        "object": "video",
        "created_at": ctx.created,
        "completed_at": ctx.created,
        "status": "completed",
        "model": ctx.model,
        "progress": 100,
        "prompt": body.get("prompt"),
        "seconds": str(body.get("seconds", "4")),
        "size": body.get("size", "720x1280"),
    }, 0


Builder = Callable[[dict[str, Any], str, int, Shared], tuple[dict[str, Any], int]]
Answer = Callable[[dict[str, Any], str, int], tuple[dict[str, Any], int]]

BUILDERS: dict[str, Builder] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/v1/responses": _responses,
    "/v1/embeddings": _embeddings,
    "/v1/moderations": _moderations,
    "/v1/images/generations": _images,
    "/v1/images/edits": _images,
    "/v1/videos": _videos,
}

ENDPOINTS = tuple(BUILDERS)

# Endpoints whose body may omit `model` (the remote picks a default).
MODEL_OPTIONAL = frozenset({"/v1/moderations"})


def answerer(endpoint: str, shared: Shared) -> Answer:
    """`answer(body, ident, input_tokens) -> (response body, output tokens)` for one batch.

    `ident` is unique per request and goes into the response's ids.
    """
    build = BUILDERS[endpoint]

    def answer(body: dict[str, Any], ident: str, tokens: int) -> tuple[dict[str, Any], int]:
        return build(body, ident, tokens, shared)

    return answer


# The whole success line of a chat completion as one bytes template: the hot path of big batches
# (about twice as fast as building and dumping the dicts). It must equal the dict builder's line;
# a test holds them together.
_CHAT_LINE = (
    b'{"id":"batch_req_%(ident)s","custom_id":%(custom_id)s,"response":{"status_code":200,'
    b'"request_id":"req_%(ident)s","body":{"id":"chatcmpl-%(ident)s","object":"chat.completion",'
    b'"created":CREATED,"model":MODEL,"choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":%(text)s,"refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":%(p)d,"completion_tokens":%(c)d,"total_tokens":%(t)d,'
    b'"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":'
    b'{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,'
    b'"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_emulator"'
    b'}},"error":null}\n'
)

LineMaker = Callable[[dict[str, Any], str, int, Any], tuple[bytes, int]]


def fast_line_maker(endpoint: str, shared: Shared) -> LineMaker | None:
    """`make(body, ident, input_tokens, custom_id) -> (whole output line, output tokens)` for
    endpoints with a template, else None."""
    if endpoint != "/v1/chat/completions":
        return None
    model = orjson.dumps(shared.model).replace(b"%", b"%%")
    template = _CHAT_LINE.replace(b"CREATED", str(int(shared.created)).encode()).replace(
        b"MODEL", model
    )
    dumps = orjson.dumps

    def make(body: dict[str, Any], ident: str, tokens: int, custom_id: Any) -> tuple[bytes, int]:
        text = reply_text(_last_message_text(body.get("messages")))
        out_tokens = max(1, len(text) // 4)
        line = template % {
            b"ident": ident.encode(),
            b"custom_id": dumps(custom_id),
            b"text": dumps(text),
            b"p": tokens,
            b"c": out_tokens,
            b"t": tokens + out_tokens,
        }
        return line, out_tokens

    return make
