"""Deterministic synthetic bodies per endpoint, and the Files endpoints' edges."""

from __future__ import annotations

import asyncio
import base64
import math
from array import array
from typing import Any

import httpx
import orjson
import pytest

from jobqueue.emulator import Emulator, EmulatorConfig, create_app
from jobqueue.emulator.responses import Shared, answerer, fast_line_maker
from tests.test_emulator_helpers import CHAT, add_input, create, manual, read_lines

__all__ = ["manual"]


def run_one(em: Emulator, endpoint: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": body}
        for i, body in enumerate(bodies)
    ]
    batch = create(em, add_input(em, lines), endpoint=endpoint)
    em.advance(600)
    batch = em.get_batch(batch["id"])
    assert batch["status"] == "completed", batch["errors"]
    out = {x["custom_id"]: x["response"]["body"] for x in read_lines(em, batch["output_file_id"])}
    return [out[f"c{i}"] for i in range(len(bodies))]


def test_embeddings_are_deterministic_unit_vectors(manual: Emulator) -> None:
    bodies = [
        {"model": "text-embedding-3-small", "input": "hello"},
        {"model": "text-embedding-3-small", "input": "hello", "dimensions": 64},
        {"model": "text-embedding-3-small", "input": ["a", "b"]},
        {"model": "text-embedding-3-small", "input": "hello", "encoding_format": "base64"},
    ]
    first = run_one(manual, "/v1/embeddings", bodies)
    again = run_one(manual, "/v1/embeddings", bodies)
    plain, small, pair, encoded = first
    vector = plain["data"][0]["embedding"]
    assert len(vector) == 1536  # text-embedding-3-small's own size
    assert math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-9)
    assert len(small["data"][0]["embedding"]) == 64
    assert [d["index"] for d in pair["data"]] == [0, 1]
    assert pair["data"][0]["embedding"] != pair["data"][1]["embedding"]
    decoded = array("f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert len(decoded) == 1536 and math.isclose(decoded[0], vector[0], rel_tol=1e-6)
    assert plain["object"] == "list" and plain["usage"]["prompt_tokens"] > 0
    assert [b["data"] for b in first] == [b["data"] for b in again]


def test_embedding_dimensions_are_configurable() -> None:
    with Emulator(EmulatorConfig(embedding_dimensions=32)) as em:
        [body] = run_one(em, "/v1/embeddings", [{"model": "e", "input": "x"}])
        assert len(body["data"][0]["embedding"]) == 32


def test_text_endpoints_answer_from_the_input(manual: Emulator) -> None:
    [chat] = run_one(
        manual,
        "/v1/chat/completions",
        [{"model": "m", "messages": [{"role": "user", "content": "What is 2+2?"}]}],
    )
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == "Emulated reply to: What is 2+2?"
    assert chat["usage"]["total_tokens"] == (
        chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]
    )
    [completion] = run_one(manual, "/v1/completions", [{"model": "m", "prompt": "Once upon"}])
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == "Emulated reply to: Once upon"
    [response] = run_one(manual, "/v1/responses", [{"model": "m", "input": "Tell me"}])
    assert response["object"] == "response" and response["status"] == "completed"
    assert response["output"][0]["content"][0]["text"] == "Emulated reply to: Tell me"
    assert response["usage"]["input_tokens"] > 0
    [moderation] = run_one(manual, "/v1/moderations", [{"input": ["one", "two"]}])
    assert len(moderation["results"]) == 2
    assert moderation["results"][0]["flagged"] is False


def test_files_list_pages_filters_and_orders(manual: Emulator) -> None:
    ids = [add_input(manual, [{"x": i}], filename=f"f{i}.jsonl") for i in range(5)]
    path = manual.upload_path()
    path.write_bytes(b"data")
    other = manual.add_file(path, filename="notes.txt", purpose="user_data", size=4)["id"]
    assert [f["id"] for f in manual.list_files()["data"]] == [other, *ids[::-1]]
    assert [f["id"] for f in manual.list_files(purpose="batch", order="asc")["data"]] == ids
    page = manual.list_files(purpose="batch", limit=2, after=ids[3])
    assert [f["id"] for f in page["data"]] == [ids[2], ids[1]] and page["has_more"]
    manual.delete_file(ids[1])
    page = manual.list_files(purpose="batch", limit=2, after=ids[3])
    assert [f["id"] for f in page["data"]] == [ids[2], ids[0]] and not page["has_more"]


def test_uploads_over_http_check_purpose_name_and_size() -> None:
    async def run() -> None:
        app = create_app(EmulatorConfig(max_upload_bytes=1000))
        transport = httpx.ASGITransport(app=app)
        auth = {"authorization": "Bearer k"}
        async with httpx.AsyncClient(transport=transport, base_url="http://e", headers=auth) as h:
            ok = await h.post(
                "/v1/files",
                files={"file": ("a.jsonl", b"{}\n")},
                data={
                    "purpose": "batch",
                    "expires_after[anchor]": "created_at",
                    "expires_after[seconds]": "3600",
                },
            )
            assert ok.status_code == 200, ok.text
            assert ok.json()["expires_at"] - ok.json()["created_at"] == 3600
            assert (await h.get(f"/v1/files/{ok.json()['id']}/content")).content == b"{}\n"
            cases: list[tuple[dict[str, Any], dict[str, Any], int, str | None]] = [
                ({"file": ("a.txt", b"{}")}, {"purpose": "batch"}, 400, "file"),
                ({"file": ("a.jsonl", b"{}")}, {"purpose": "nope"}, 400, "purpose"),
                ({"file": ("a.jsonl", b"{}")}, {}, 400, "purpose"),
                ({"file": ("a.jsonl", b"x" * 1001)}, {"purpose": "batch"}, 413, "file"),
                (
                    {"file": ("a.jsonl", b"{}")},
                    {
                        "purpose": "batch",
                        "expires_after[anchor]": "created_at",
                        "expires_after[seconds]": "10",
                    },
                    400,
                    "expires_after.seconds",
                ),
            ]
            for files, data, status, param in cases:
                r = await h.post("/v1/files", files=files, data=data)
                assert r.status_code == status, (data, r.text)
                assert r.json()["error"]["param"] == param
            r = await h.post("/v1/files", data={"purpose": "batch"})
            assert r.status_code == 400
        em: Emulator = app.state.emulator
        assert em.stats()["files_created"] == 1
        assert [p.name for p in em.files_dir.iterdir()] == [ok.json()["id"]]  # no leftovers
        em.close()

    asyncio.run(run())


@pytest.mark.parametrize("endpoint", ["/v1/images/generations", "/v1/videos"])
def test_newer_endpoints_are_accepted(manual: Emulator, endpoint: str) -> None:
    [body] = run_one(manual, endpoint, [{"model": "m", "prompt": "a cat"}])
    assert body


@pytest.mark.parametrize(
    ("model", "messages", "extra"),
    [
        ("gpt-4o-mini", [{"role": "user", "content": "plain"}], {}),
        ('odd "model" 100%', [{"role": "user", "content": 'quotes " and \\ and é ☃ %s %d'}], {}),
        ("m", [{"role": "user", "content": [{"type": "text", "text": "parts"}]}], {}),
        ("m", [], {}),
        (None, "not a list", {}),
        ("gpt-4o-mini", [{"role": "user", "content": "cut short"}], {"max_tokens": 3}),
        ("o3-mini", [{"role": "user", "content": "think"}], {}),
        ("o3-mini", [{"role": "user", "content": "think"}], {"max_completion_tokens": 20}),
        ("gpt-4o", [{"role": "user", "content": "think"}], {"reasoning_effort": "high"}),
    ],
)
def test_chat_fast_path_equals_the_dict_builder(
    model: Any, messages: Any, extra: dict[str, Any]
) -> None:
    shared = Shared(created=1700000000, model=model, embedding_dimensions=8)
    body = {"model": model, "messages": messages, **extra}
    make = fast_line_maker(CHAT, shared)
    assert make is not None
    line, out_tokens, reasoning = make(body, "abc00000001", 42, 7, 'custom "id" ✓')
    built, built_tokens, built_reasoning = answerer(CHAT, shared)(body, "abc00000001", 42, 7)
    assert (out_tokens, reasoning) == (built_tokens, built_reasoning)
    assert line.endswith(b"\n")
    assert orjson.loads(line) == {
        "id": "batch_req_abc00000001",
        "custom_id": 'custom "id" ✓',
        "response": {"status_code": 200, "request_id": "req_abc00000001", "body": built},
        "error": None,
    }
    usage = built["usage"]
    assert usage["completion_tokens"] == out_tokens
    assert usage["completion_tokens_details"]["reasoning_tokens"] == reasoning
    assert usage["prompt_tokens_details"]["cached_tokens"] == 7
    limit = extra.get("max_tokens", extra.get("max_completion_tokens"))
    if limit is not None:
        assert out_tokens <= limit
