"""Fidelity: the official `openai` SDK drives every endpoint and parses every answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types import Batch, FileDeleted, FileObject

from jobqueue.emulator import Emulator, EmulatorConfig, create_app, serve_in_thread
from tests.test_emulator_helpers import CHAT, TERMINAL, chat_line, jsonl


def async_client(app: Any, **kwargs: Any) -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=app)
    return openai.AsyncOpenAI(
        api_key=kwargs.pop("api_key", "sk-test"),
        base_url="http://emulator.test/v1",
        http_client=httpx.AsyncClient(transport=transport, base_url="http://emulator.test"),
        max_retries=kwargs.pop("max_retries", 0),
        **kwargs,
    )


@pytest.fixture
def running() -> Iterator[Any]:
    with serve_in_thread(EmulatorConfig(time_scale=10_000, seed=11)) as server:
        yield server


def test_sdk_in_process_drives_every_endpoint() -> None:
    async def scenario() -> None:
        app = create_app(EmulatorConfig(time_scale=10_000, seed=1))
        emulator: Emulator = app.state.emulator
        client = async_client(app)
        try:
            data = jsonl([chat_line(i) for i in range(30)])
            uploaded = await client.files.create(
                file=("input.jsonl", data),
                purpose="batch",
                expires_after={"anchor": "created_at", "seconds": 7200},
            )
            assert isinstance(uploaded, FileObject)
            assert uploaded.id.startswith("file-")
            assert uploaded.bytes == len(data) and uploaded.filename == "input.jsonl"
            assert uploaded.purpose == "batch" and uploaded.status == "processed"
            assert uploaded.expires_at is not None
            raw = await client.files.with_raw_response.retrieve(uploaded.id)
            assert raw.headers["x-request-id"].startswith("req_")
            FileObject.model_validate(orjson.loads(raw.content))  # strict: every field valid
            assert [f.id async for f in client.files.list(purpose="batch")] == [uploaded.id]

            created = await client.batches.create(
                input_file_id=uploaded.id,
                endpoint=CHAT,
                completion_window="24h",
                metadata={"job": "sdk"},
                output_expires_after={"anchor": "created_at", "seconds": 3600},
            )
            assert isinstance(created, Batch) and created.status == "validating"
            assert created.request_counts is not None and created.request_counts.total == 0
            batch = created
            for _ in range(2000):
                batch = await client.batches.retrieve(created.id)
                if batch.status in TERMINAL:
                    break
                await asyncio.sleep(0.002)
            assert batch.status == "completed"
            raw = await client.batches.with_raw_response.retrieve(created.id)
            strict = Batch.model_validate(orjson.loads(raw.content))
            assert strict.usage is not None and strict.usage.total_tokens > 0
            assert strict.request_counts is not None
            assert strict.request_counts.completed == 30

            content = await client.files.content(batch.output_file_id or "")
            lines = [orjson.loads(x) for x in content.content.splitlines()]
            assert len(lines) == 30
            output = await client.files.retrieve(batch.output_file_id or "")
            assert output.purpose == "batch_output" and output.bytes == len(content.content)

            for i in range(4):
                await client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint=CHAT,
                    completion_window="24h",
                    metadata={"n": str(i)},
                )
            page = await client.batches.list(limit=2)
            assert len(page.data) == 2 and page.has_more
            walked = [b.id async for b in client.batches.list(limit=2)]  # pages with `after`
            assert len(walked) == 5 and walked[-1] == created.id
            assert emulator.stats()["calls"]["GET /v1/batches"] >= 4

            deleted = await client.files.delete(uploaded.id)
            assert isinstance(deleted, FileDeleted) and deleted.deleted
            with pytest.raises(openai.NotFoundError) as info:
                await client.files.retrieve(uploaded.id)
            assert info.value.status_code == 404
            assert info.value.request_id is not None
            with pytest.raises(openai.ConflictError) as conflict:
                await client.batches.cancel(created.id)
            assert conflict.value.message.endswith("Cannot cancel a batch with status 'completed'.")
            assert isinstance(conflict.value.body, dict)
            assert (
                conflict.value.body["message"] == "Cannot cancel a batch with status 'completed'."
            )
        finally:
            await client.close()
            emulator.close()

    asyncio.run(scenario())


def test_sdk_error_classes_in_process() -> None:
    async def scenario() -> None:
        app = create_app(EmulatorConfig(time_scale=10_000, api_key="sk-right", seed=2))
        good = async_client(app, api_key="sk-right")
        bad = async_client(app, api_key="sk-wrong-key-123")
        try:
            with pytest.raises(openai.AuthenticationError) as auth:
                await bad.batches.list()
            assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
            with pytest.raises(openai.NotFoundError):
                await good.batches.retrieve("batch_nope")
            with pytest.raises(openai.BadRequestError) as bad_request:
                await good.batches.create(
                    input_file_id="file-x",
                    endpoint="/v1/nope",  # type: ignore[arg-type]
                    completion_window="24h",
                )
            assert bad_request.value.code == "invalid_value"
            assert bad_request.value.param == "endpoint"
            app.state.emulator.set_faults(fault_429=1.0)
            with pytest.raises(openai.RateLimitError) as limited:
                await good.batches.list()
            assert limited.value.response.headers["retry-after"] == "1"
            assert limited.value.response.headers["x-request-id"]
            app.state.emulator.set_faults(fault_429=0.0, fault_500=1.0)
            with pytest.raises(openai.InternalServerError):
                await good.files.list()
        finally:
            await good.close()
            await bad.close()
            app.state.emulator.close()

    asyncio.run(scenario())


def test_missing_key_is_401_and_azure_api_key_header_works() -> None:
    async def scenario() -> None:
        app = create_app(EmulatorConfig(api_key="azure-key"))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as http:
            r = await http.get("/v1/batches")
            assert r.status_code == 401 and r.headers["x-request-id"]
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            r = await http.get("/openai/v1/batches", headers={"api-key": "azure-key"})
            assert r.status_code == 200 and r.json()["object"] == "list"
            r = await http.get("/v1/nothing/here", headers={"authorization": "Bearer azure-key"})
            assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        app.state.emulator.close()

    asyncio.run(scenario())


def test_sdk_batch_example_over_a_real_port(running: Any, tmp_path: Path) -> None:
    """The official batch guide's steps, unchanged but for base_url."""
    client = openai.OpenAI(api_key="sk-anything", base_url=running.base_url, max_retries=0)
    data = jsonl(
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-3.5-turbo-0125",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Hello world!"},
                ],
                "max_tokens": 1000,
            },
        }
        for i in range(2)
    )
    (tmp_path / "batchinput.jsonl").write_bytes(data)
    with open(tmp_path / "batchinput.jsonl", "rb") as f:
        batch_input_file = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(
        input_file_id=batch_input_file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"description": "nightly eval job"},
    )
    deadline = time.monotonic() + 10
    while batch.status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.01)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    file_response = client.files.content(batch.output_file_id or "")
    lines = [orjson.loads(x) for x in file_response.text.splitlines()]
    assert {x["custom_id"] for x in lines} == {"request-0", "request-1"}
    body = lines[0]["response"]["body"]
    assert body["choices"][0]["message"]["content"] == "Emulated reply to: Hello world!"
    # Walk every page of a longer list with the SDK's own paginator.
    for _ in range(7):
        client.batches.create(
            input_file_id=batch_input_file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert len(list(client.batches.list(limit=3))) == 8
    assert running.emulator.stats()["calls"]["GET /v1/batches"] == 3
    client.close()


def test_sdk_sees_a_dropped_connection_over_a_real_port(running: Any) -> None:
    client = openai.OpenAI(api_key="k", base_url=running.base_url, max_retries=0)
    running.emulator.set_faults(fault_drop=1.0)
    with pytest.raises(openai.APIConnectionError) as info:
        client.batches.list()
    # The SDK's own client is httpx2: the cause is its RemoteProtocolError (or a reset).
    assert type(info.value.__cause__).__name__ in ("RemoteProtocolError", "ReadError")
    running.emulator.set_faults(fault_drop=0.0)
    assert client.batches.list().data == []  # the server lives on
    client.close()
