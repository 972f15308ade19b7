"""Realistic usage: per-line token counts summed into the batch's usage, output limits,
reasoning and cached tokens, embedding sizes per model, and SDK-valid response bodies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from openai.types import Batch, Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from jobqueue.emulator import Emulator, EmulatorConfig
from jobqueue.tokens import input_tokens
from tests.test_emulator_helpers import add_input, create, read_lines

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
LONG_SYSTEM = "You follow the house style guide to the letter. " * 120  # ~1,200 tokens


@pytest.fixture
def em() -> Iterator[Emulator]:
    emulator = Emulator(EmulatorConfig(time_scale=1.0, seed=7))
    yield emulator
    emulator.close()


def run(
    em: Emulator, endpoint: str, bodies: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(the finished batch, its output lines, its error lines)."""
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": body}
        for i, body in enumerate(bodies)
    ]
    batch = create(em, add_input(em, lines), endpoint=endpoint)
    em.advance(3600)
    batch = em.get_batch(batch["id"])
    assert batch["status"] in ("completed", "expired"), batch["errors"]
    out = read_lines(em, batch["output_file_id"]) if batch["output_file_id"] else []
    err = read_lines(em, batch["error_file_id"]) if batch["error_file_id"] else []
    return batch, out, err


def line_usage(endpoint: str, body: dict[str, Any]) -> tuple[int, int, int, int]:
    """(input, cached input, output, reasoning) tokens of one response body, by its own shape."""
    usage = body["usage"]
    if endpoint == RESPONSES:
        assert set(usage) == {
            "input_tokens",
            "input_tokens_details",
            "output_tokens",
            "output_tokens_details",
            "total_tokens",
        }
        got = (
            usage["input_tokens"],
            usage["input_tokens_details"]["cached_tokens"],
            usage["output_tokens"],
            usage["output_tokens_details"]["reasoning_tokens"],
        )
        assert usage["total_tokens"] == got[0] + got[2]
        return got
    if endpoint == EMBEDDINGS:
        assert set(usage) == {"prompt_tokens", "total_tokens"}
        assert usage["total_tokens"] == usage["prompt_tokens"]
        return usage["prompt_tokens"], 0, 0, 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if endpoint == COMPLETIONS:
        return usage["prompt_tokens"], 0, usage["completion_tokens"], 0
    return (
        usage["prompt_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
        usage["completion_tokens"],
        usage["completion_tokens_details"]["reasoning_tokens"],
    )


def chat_bodies(model: str = "gpt-4o-mini") -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    for i in range(40):
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": f"Question {i}: " + "why? " * (i % 7)}],
        }
        if i % 5 == 0:
            body["messages"].insert(0, {"role": "system", "content": LONG_SYSTEM})
        if i % 4 == 1:
            body["max_tokens"] = 3
        if i % 6 == 2:
            body["reasoning_effort"] = "low"
        bodies.append(body)
    return bodies


BODIES: dict[str, list[dict[str, Any]]] = {
    CHAT: chat_bodies(),
    RESPONSES: [
        {
            "model": "o4-mini",
            **({"reasoning": {"effort": "minimal"}} if i % 2 else {}),
            "instructions": LONG_SYSTEM if i % 3 == 0 else "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": f"Item {i}"}]},
            ]
            if i % 4
            else f"Item {i} " * 30,
            **({"max_output_tokens": 12} if i % 5 == 0 else {}),
        }
        for i in range(30)
    ],
    COMPLETIONS: [
        {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time " * (i % 9 + 1)}
        for i in range(30)
    ],
    EMBEDDINGS: [
        {
            "model": "text-embedding-3-small",
            "input": [f"text {i}", "and more"] if i % 3 else [101, 202, 303],
            "dimensions": 8,
        }
        for i in range(30)
    ],
}


@pytest.mark.parametrize("endpoint", list(BODIES))
def test_usage_per_line_sums_exactly_into_the_batch_usage(em: Emulator, endpoint: str) -> None:
    em.set_faults(request_failure_rate=0.2)  # failed lines are not counted
    bodies = BODIES[endpoint]
    batch, out, err = run(em, endpoint, bodies)
    assert out and err
    by_id = {f"c{i}": body for i, body in enumerate(bodies)}
    sums = [0, 0, 0, 0]
    for line in out:
        body = line["response"]["body"]
        got = line_usage(endpoint, body)
        # Input tokens are jobqueue's own estimate of the request.
        assert got[0] == input_tokens(endpoint, by_id[line["custom_id"]]) > 0
        assert got[1] <= got[0] and got[3] <= got[2]
        sums = [a + b for a, b in zip(sums, got, strict=True)]
    usage = Batch.model_validate(batch).usage
    assert usage is not None
    assert [
        usage.input_tokens,
        usage.input_tokens_details.cached_tokens,
        usage.output_tokens,
        usage.output_tokens_details.reasoning_tokens,
    ] == sums
    assert usage.total_tokens == sums[0] + sums[2]
    if endpoint in (CHAT, RESPONSES):
        assert sums[1] > 0 and sums[3] > 0  # some cached, some reasoning
    if endpoint != EMBEDDINGS:
        assert sums[2] > 0


def test_an_expired_batch_counts_only_what_ran(em: Emulator) -> None:
    em.script_next(expire_at_fraction=0.5)
    batch, out, err = run(em, CHAT, chat_bodies())
    assert batch["status"] == "expired" and len(out) == 20 and len(err) == 20
    ran = [x["response"]["body"]["usage"] for x in out]
    assert batch["usage"]["input_tokens"] == sum(u["prompt_tokens"] for u in ran)
    assert batch["usage"]["output_tokens"] == sum(u["completion_tokens"] for u in ran)


def test_output_limits_reasoning_and_cache(em: Emulator) -> None:
    bodies = [
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "A long question " * 9}]},
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "Cut"}], "max_tokens": 2},
        {"model": "o3", "messages": [{"role": "user", "content": "Think"}]},
        {"model": "o3", "messages": [{"role": "user", "content": "Think"}],
         "max_completion_tokens": 5},
        {"model": "o3", "messages": [{"role": "user", "content": "Think"}],
         "reasoning_effort": "minimal"},
        {"model": "gpt-4o", "messages": [{"role": "system", "content": LONG_SYSTEM},
                                         {"role": "user", "content": "first"}]},
        {"model": "gpt-4o", "messages": [{"role": "system", "content": LONG_SYSTEM},
                                         {"role": "user", "content": "second"}]},
    ]  # fmt: skip
    # One model a batch: the o3 requests run in their own batch.
    plain, _, _ = run(em, CHAT, [b for b in bodies if b["model"] == "gpt-4o"])
    reasoning, _, _ = run(em, CHAT, [b for b in bodies if b["model"] == "o3"])
    answers = [x["response"]["body"] for x in read_lines(em, plain["output_file_id"])]
    answers += [x["response"]["body"] for x in read_lines(em, reasoning["output_file_id"])]
    full, cut, cached_first, cached_second, think, think_cut, minimal = (
        ChatCompletion.model_validate(a) for a in answers
    )
    assert full.choices[0].finish_reason == "stop" and full.usage is not None
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens <= 2
    first, second = cached_first.usage, cached_second.usage
    assert first and first.prompt_tokens_details and second and second.prompt_tokens_details
    assert first.prompt_tokens_details.cached_tokens == 0  # the first one writes the cache
    cached = second.prompt_tokens_details.cached_tokens or 0
    assert cached >= 1024 and cached % 128 == 0 and cached <= second.prompt_tokens
    assert think.usage and think.usage.completion_tokens_details
    thought = think.usage.completion_tokens_details.reasoning_tokens or 0
    assert thought == 3 * (think.usage.completion_tokens - thought)  # medium: 3 a visible token
    assert think_cut.usage is not None and think_cut.usage.completion_tokens == 5
    assert think_cut.choices[0].finish_reason == "length"
    assert minimal.usage and minimal.usage.completion_tokens_details
    assert minimal.usage.completion_tokens_details.reasoning_tokens == 0


def test_responses_bodies_validate_with_the_sdk(em: Emulator) -> None:
    _, out, _ = run(em, RESPONSES, BODIES[RESPONSES])
    statuses = set()
    for line in out:
        response = Response.model_validate(line["response"]["body"])
        assert response.usage is not None
        assert response.usage.input_tokens_details.cache_write_tokens == 0
        statuses.add(response.status)
        if response.status == "incomplete":
            assert response.incomplete_details is not None
            assert response.usage.output_tokens <= 12
    assert statuses == {"completed", "incomplete"}
    _, out, _ = run(em, COMPLETIONS, BODIES[COMPLETIONS])
    for line in out:
        completion = Completion.model_validate(line["response"]["body"])
        assert completion.usage is not None and completion.usage.completion_tokens <= 16


@pytest.mark.parametrize(
    ("model", "dimensions", "configured", "size"),
    [
        ("text-embedding-3-small", None, None, 1536),
        ("text-embedding-3-large", None, None, 3072),
        ("text-embedding-ada-002", None, None, 1536),
        ("my-azure-deployment", None, None, 1536),
        ("text-embedding-3-large", 256, None, 256),
        ("text-embedding-3-large", None, 40, 40),
        ("text-embedding-3-large", 12, 40, 12),
    ],
)
def test_embedding_sizes_per_model(
    model: str, dimensions: int | None, configured: int | None, size: int
) -> None:
    with Emulator(EmulatorConfig(embedding_dimensions=configured)) as emulator:
        body: dict[str, Any] = {"model": model, "input": ["one", "two"]}
        if dimensions:
            body["dimensions"] = dimensions
        _, [line], _ = run(emulator, EMBEDDINGS, [body])
        parsed = CreateEmbeddingResponse.model_validate(line["response"]["body"])
        assert [len(d.embedding) for d in parsed.data] == [size, size]


def test_bad_embedding_dimensions_are_refused() -> None:
    with pytest.raises(ValueError, match="embedding_dimensions"):
        EmulatorConfig(embedding_dimensions=0)
