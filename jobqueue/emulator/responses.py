"""Deterministic synthetic response bodies, one builder per batch endpoint.

The same request body always gives the same answer (ids and `created` aside), so tests can
assert on content. Builders are on the hot path of output generation (a million lines), so
they stay plain dict building with no per-line hashing beyond what the body needs.

Usage is realistic: input tokens are `jobqueue.tokens.input_tokens` of the request (the
heuristic jobqueue itself estimates with), output tokens the same estimate of the generated
text. The reply respects the request's output limit (`max_completion_tokens`, `max_tokens`,
`max_output_tokens`; 16 on completions by default): past it the text is cut and the answer says
so (`finish_reason: "length"`, or a `responses` status `incomplete`). Reasoning models (o1, o3,
o4, gpt-5; or any request naming a reasoning effort) report reasoning tokens, a multiple of the
visible ones by effort, inside the output tokens and the limit. A long shared prefix (every
message but the last, at least 1,024 tokens) that an earlier request of the same batch already
sent counts as cached, in steps of 128 tokens, as the remote's prompt caching does.
"""

from __future__ import annotations

import base64
import hashlib
import math
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from jobqueue.tokens import REPLY_PRIMING, encoding_for_model, input_tokens, text_counter

SNIPPET_CHARS = 48
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"

# Vector sizes of the embedding models, when neither the request (`dimensions`) nor the
# emulator's configuration (`embedding_dimensions`) says otherwise.
MODEL_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
DEFAULT_EMBEDDING_DIMENSIONS = 1536

# Reasoning tokens per visible output token, by effort; models of these families reason
# (at "medium") unless told otherwise.
REASONING_FACTOR = {"none": 0, "minimal": 0, "low": 1, "medium": 3, "high": 8}
REASONING_MODELS = ("o1", "o3", "o4", "gpt-5")
# Prompt caching: prefixes of at least this many tokens, cached in steps of CACHE_STEP.
CACHE_MIN_TOKENS = 1024
CACHE_STEP = 128
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class Shared:
    """What every answer of one batch shares."""

    created: int
    model: str | None
    # Overrides every model's own size when set (`--embedding-dimensions`).
    embedding_dimensions: int | None = None
    encoding: str = field(init=False)
    count: Callable[[str], float] = field(init=False, repr=False)
    dimensions: int = field(init=False)

    def __post_init__(self) -> None:
        self.encoding = encoding_for_model(self.model)
        self.count = text_counter(self.encoding)
        name = self.model if isinstance(self.model, str) else ""
        self.dimensions = self.embedding_dimensions or MODEL_DIMENSIONS.get(
            name, DEFAULT_EMBEDDING_DIMENSIONS
        )


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


def _limit(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def output_limit(endpoint: str, body: dict[str, Any]) -> int | None:
    """The most output tokens of one choice, reasoning included; None when unbounded."""
    if endpoint == CHAT:
        limit = _limit(body.get("max_completion_tokens"))
        return limit if limit is not None else _limit(body.get("max_tokens"))
    if endpoint == RESPONSES:
        return _limit(body.get("max_output_tokens"))
    if endpoint == COMPLETIONS:
        raw = body.get("max_tokens")
        return COMPLETIONS_DEFAULT_MAX_TOKENS if raw is None else _limit(raw)
    return None


def reasoning_factor(endpoint: str, body: dict[str, Any], model: Any) -> int:
    effort: Any = None
    if endpoint == CHAT:
        effort = body.get("reasoning_effort")
    elif endpoint == RESPONSES:
        reasoning = body.get("reasoning")
        if isinstance(reasoning, dict):
            effort = reasoning.get("effort")
    if effort is None:
        name = model.lower() if isinstance(model, str) else ""
        if not name.startswith(REASONING_MODELS) or "chat" in name:
            return 0
        effort = "medium"
    return REASONING_FACTOR.get(effort, REASONING_FACTOR["medium"])


def make_reply(
    prompt: str, limit: int | None, factor: int, count: Callable[[str], float]
) -> tuple[str, int, int, bool]:
    """(text, its tokens, reasoning tokens, whether it ended by itself) within `limit`;
    `count` is the batch's `jobqueue.tokens.text_counter`."""
    text = reply_text(prompt)
    visible = int(count(text) + 0.5)
    reasoning = visible * factor
    if limit is None or visible + reasoning <= limit:
        return text, visible, reasoning, True
    reasoning = min(reasoning, limit)
    room = limit - reasoning
    text = text[: len(text) * room // max(visible, 1)]
    while text and int(count(text) + 0.5) > room:
        text = text[:-1]
    return text, int(count(text) + 0.5), reasoning, False


def cached_tokens(
    endpoint: str, body: dict[str, Any], tokens: int, seen: set[int], encoding: str
) -> int:
    """Cached input tokens of a request: its prefix (all but the last message or input item,
    with the tools and instructions) when an earlier request of the batch sent the same one."""
    if tokens < CACHE_MIN_TOKENS:
        return 0
    prefix: dict[str, Any]
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or len(messages) < 2:
            return 0
        prefix = {"messages": messages[:-1], "tools": body.get("tools")}
    elif endpoint == RESPONSES:
        items = body.get("input")
        prefix = {
            "instructions": body.get("instructions"),
            "input": items[:-1] if isinstance(items, list) else [],
            "tools": body.get("tools"),
        }
    else:
        return 0
    prefix_tokens = input_tokens(endpoint, prefix, encoding=encoding) - REPLY_PRIMING
    if prefix_tokens < CACHE_MIN_TOKENS:
        return 0
    key = hash(orjson.dumps(prefix))
    if key not in seen:
        seen.add(key)
        return 0
    return min(tokens, prefix_tokens // CACHE_STEP * CACHE_STEP)


Built = tuple[dict[str, Any], int, int]  # (response body, output tokens, reasoning tokens)


def _chat(body: dict[str, Any], ident: str, tokens: int, cached: int, ctx: Shared) -> Built:
    text, visible, reasoning, done = make_reply(
        _last_message_text(body.get("messages")),
        output_limit(CHAT, body),
        reasoning_factor(CHAT, body, ctx.model),
        ctx.count,
    )
    out_tokens = visible + reasoning
    return (
        {
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
                    "finish_reason": "stop" if done else "length",
                }
            ],
            "usage": {
                "prompt_tokens": tokens,
                "completion_tokens": out_tokens,
                "total_tokens": tokens + out_tokens,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": reasoning,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": "fp_emulator",
        },
        out_tokens,
        reasoning,
    )


def _completion(body: dict[str, Any], ident: str, tokens: int, cached: int, ctx: Shared) -> Built:
    text, visible, _, done = make_reply(
        _text_of(body.get("prompt")), output_limit(COMPLETIONS, body), 0, ctx.count
    )
    return (
        {
            "id": f"cmpl-{ident}",
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [
                {
                    "text": text,
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "stop" if done else "length",
                }
            ],
            "usage": {
                "prompt_tokens": tokens,
                "completion_tokens": visible,
                "total_tokens": tokens + visible,
            },
            "system_fingerprint": "fp_emulator",
        },
        visible,
        0,
    )


def _responses(body: dict[str, Any], ident: str, tokens: int, cached: int, ctx: Shared) -> Built:
    text, visible, reasoning, done = make_reply(
        _text_of(body.get("input")),
        output_limit(RESPONSES, body),
        reasoning_factor(RESPONSES, body, ctx.model),
        ctx.count,
    )
    out_tokens = visible + reasoning
    output: list[dict[str, Any]] = []
    if reasoning:
        output.append({"type": "reasoning", "id": f"rs_{ident}", "summary": []})
    output.append(
        {
            "type": "message",
            "id": f"msg_{ident}",
            "status": "completed" if done else "incomplete",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
    )
    return (
        {
            "id": f"resp_{ident}",
            "object": "response",
            "created_at": ctx.created,
            "status": "completed" if done else "incomplete",
            "error": None,
            "incomplete_details": None if done else {"reason": "max_output_tokens"},
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": ctx.model,
            "output": output,
            "parallel_tool_calls": True,
            "temperature": body.get("temperature", 1.0),
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "usage": {
                "input_tokens": tokens,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": out_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": tokens + out_tokens,
            },
            "metadata": body.get("metadata") or {},
        },
        out_tokens,
        reasoning,
    )


def unit_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text` (SHAKE-256 bytes read as signed 16-bit ints)."""
    raw = array("h", hashlib.shake_256(text.encode()).digest(2 * dimensions))
    scale = 1.0 / (math.hypot(*raw) or 1.0)
    return [v * scale for v in raw]


def _embedding_inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]  # one tokenised input
        return [v if isinstance(v, str) else " ".join(map(str, v)) for v in value]
    return [str(value)]


def _embeddings(body: dict[str, Any], ident: str, tokens: int, cached: int, ctx: Shared) -> Built:
    dims = body.get("dimensions") or ctx.dimensions
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(_embedding_inputs(body.get("input"))):
        vector: Any = unit_vector(text, int(dims))
        if as_base64:
            vector = base64.b64encode(array("f", vector).tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return (
        {
            "object": "list",
            "data": data,
            "model": ctx.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        0,
        0,
    )


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


def _moderations(body: dict[str, Any], ident: str, tokens: int, cached: int, ctx: Shared) -> Built:
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
    return {"id": f"modr-{ident}", "model": ctx.model, "results": results}, 0, 0


def _images(body: dict[str, Any], ident: str, tokens: int, cached: int, ctx: Shared) -> Built:
    n = int(body.get("n") or 1)
    data = [{"url": f"https://emulator.invalid/images/{ident}-{i}.png"} for i in range(n)]
    return (
        {
            "created": ctx.created,
            "data": data,
            "usage": {
                "input_tokens": tokens,
                "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0},
                "output_tokens": 0,
                "total_tokens": tokens,
            },
        },
        0,
        0,
    )


def _videos(body: dict[str, Any], ident: str, tokens: int, cached: int, ctx: Shared) -> Built:
    return (
        {
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
        },
        0,
        0,
    )


Builder = Callable[[dict[str, Any], str, int, int, Shared], Built]
Answer = Callable[[dict[str, Any], str, int, int], Built]

BUILDERS: dict[str, Builder] = {
    CHAT: _chat,
    COMPLETIONS: _completion,
    RESPONSES: _responses,
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
    """`answer(body, ident, input_tokens, cached_tokens) -> (response body, output tokens,
    reasoning tokens)` for one batch. `ident` is unique per request and goes into the ids."""
    build = BUILDERS[endpoint]

    def answer(body: dict[str, Any], ident: str, tokens: int, cached: int) -> Built:
        return build(body, ident, tokens, cached, shared)

    return answer


# The whole success line of a chat completion as one bytes template: the hot path of big batches
# (about twice as fast as building and dumping the dicts). It must equal the dict builder's line;
# a test holds them together.
_CHAT_LINE = (
    b'{"id":"batch_req_%(ident)s","custom_id":%(custom_id)s,"response":{"status_code":200,'
    b'"request_id":"req_%(ident)s","body":{"id":"chatcmpl-%(ident)s","object":"chat.completion",'
    b'"created":CREATED,"model":MODEL,"choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":%(text)s,"refusal":null,"annotations":[]},"logprobs":null,'
    b'"finish_reason":%(finish)s}],'
    b'"usage":{"prompt_tokens":%(p)d,"completion_tokens":%(c)d,"total_tokens":%(t)d,'
    b'"prompt_tokens_details":{"cached_tokens":%(cached)d,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":%(r)d,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default",'
    b'"system_fingerprint":"fp_emulator"}},"error":null}\n'
)
_FINISH = {True: b'"stop"', False: b'"length"'}

LineMaker = Callable[[dict[str, Any], str, int, int, Any], tuple[bytes, int, int]]


def fast_line_maker(endpoint: str, shared: Shared) -> LineMaker | None:
    """`make(body, ident, input_tokens, cached_tokens, custom_id) -> (whole output line,
    output tokens, reasoning tokens)` for endpoints with a template, else None."""
    if endpoint != CHAT:
        return None
    model = orjson.dumps(shared.model).replace(b"%", b"%%")
    template = _CHAT_LINE.replace(b"CREATED", str(int(shared.created)).encode()).replace(
        b"MODEL", model
    )
    dumps = orjson.dumps
    count = shared.count
    # The batch's model decides whether it reasons; only a request naming an effort differs.
    model_factor = reasoning_factor(CHAT, {}, shared.model)

    def make(
        body: dict[str, Any], ident: str, tokens: int, cached: int, custom_id: Any
    ) -> tuple[bytes, int, int]:
        factor = model_factor
        if "reasoning_effort" in body:
            factor = reasoning_factor(CHAT, body, shared.model)
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        if limit is None and not factor:  # the common case, inlined
            text = reply_text(_last_message_text(body.get("messages")))
            visible, reasoning, done = int(count(text) + 0.5), 0, True
        else:
            text, visible, reasoning, done = make_reply(
                _last_message_text(body.get("messages")), _limit(limit), factor, count
            )
        out_tokens = visible + reasoning
        line = template % {
            b"ident": ident.encode(),
            b"custom_id": dumps(custom_id),
            b"text": dumps(text),
            b"finish": _FINISH[done],
            b"p": tokens,
            b"c": out_tokens,
            b"t": tokens + out_tokens,
            b"cached": cached,
            b"r": reasoning,
        }
        return line, out_tokens, reasoning

    return make
