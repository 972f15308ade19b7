"""Injected faults (reproducible with a seed), per-batch scripts and the control API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from jobqueue.emulator import Emulator, EmulatorConfig, create_app, serve_in_thread
from jobqueue.emulator.faults import DroppedConnection
from tests.test_emulator_helpers import CHAT, add_input, chat_line, jsonl

AUTH = {"authorization": "Bearer sk-test"}


def statuses(seed: int, calls: int = 60) -> list[int]:
    async def run() -> list[int]:
        app = create_app(EmulatorConfig(seed=seed, fault_500=0.2, fault_429=0.2))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as http:
            out = [(await http.get("/v1/batches", headers=AUTH)).status_code for _ in range(calls)]
        app.state.emulator.close()
        return out

    return asyncio.run(run())


def test_faults_are_reproducible_with_a_seed() -> None:
    first, again, other = statuses(5), statuses(5), statuses(6)
    assert first == again
    assert first != other
    assert {200, 429, 500} == set(first)
    assert 10 <= first.count(500) + first.count(429) <= 40


@pytest.fixture
def served() -> Iterator[Any]:
    with serve_in_thread(EmulatorConfig(time_scale=10_000, seed=3)) as server:
        yield server


def test_error_faults_have_the_documented_shape(served: Any) -> None:
    em: Emulator = served.emulator
    with httpx.Client(base_url=served.url, headers=AUTH) as http:
        em.set_faults(fault_500=1.0)
        r = http.get("/v1/files")
        assert r.status_code == 500 and r.headers["x-request-id"]
        assert r.json()["error"]["type"] == "server_error"
        em.set_faults(fault_500=0.0, fault_429=1.0, retry_after_seconds=3)
        r = http.get("/v1/files")
        assert r.status_code == 429
        assert r.headers["retry-after"] == "3" and r.headers["retry-after-ms"] == "3000"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        em.set_faults(fault_429=0.0, fault_slow=1.0, slow_seconds=0.3)
        started = time.perf_counter()
        assert http.get("/v1/files").status_code == 200
        assert time.perf_counter() - started >= 0.3
    injected = em.stats()["faults"]["injected"]
    assert injected["500"] == 1 and injected["429"] == 1 and injected["slow"] == 1
    assert em.stats()["calls"]["GET /v1/files"] == 3


def test_dropped_connection_over_a_real_socket(served: Any) -> None:
    served.emulator.set_faults(drop=1.0)
    with httpx.Client(base_url=served.url, headers=AUTH) as http:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            http.get("/v1/batches")
        served.emulator.set_faults(drop=0.0)
        assert http.get("/v1/batches").status_code == 200


def test_dropped_connection_in_process_raises_a_transport_error() -> None:
    async def run() -> None:
        app = create_app(EmulatorConfig(fault_drop=1.0))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/v1/batches", headers=AUTH)
        app.state.emulator.close()

    asyncio.run(run())


def test_cut_download_sends_full_length_then_stops(served: Any) -> None:
    em: Emulator = served.emulator
    data = jsonl([chat_line(i) for i in range(2000)])
    with httpx.Client(base_url=served.url, headers=AUTH) as http:
        file_id = http.post(
            "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}
        ).json()["id"]
        em.set_faults(fault_cut_download=1.0)
        with http.stream("GET", f"/v1/files/{file_id}/content") as r:
            assert r.status_code == 200
            assert int(r.headers["content-length"]) == len(data)
            with pytest.raises(httpx.RemoteProtocolError):
                r.read()
        em.set_faults(fault_cut_download=0.0)
        assert http.get(f"/v1/files/{file_id}/content").content == data
    assert em.stats()["faults"]["injected"]["cut_download"] == 1


def test_cut_download_in_process() -> None:
    async def run() -> None:
        app = create_app(EmulatorConfig(fault_cut_download=1.0))
        em: Emulator = app.state.emulator
        file_id = add_input(em, [chat_line(i) for i in range(10)])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as http:
            with pytest.raises(DroppedConnection):
                await http.get(f"/v1/files/{file_id}/content", headers=AUTH)
        em.close()

    asyncio.run(run())


def test_sdk_retries_through_429s_with_retry_after() -> None:
    with serve_in_thread(EmulatorConfig(seed=9, fault_429=0.4, retry_after_seconds=0.01)) as server:
        client = openai.OpenAI(api_key="k", base_url=server.base_url, max_retries=8)
        for _ in range(15):
            assert client.batches.list().object == "list"
        assert server.emulator.stats()["faults"]["injected"]["429"] > 0
        client.close()


def test_fail_next_calls_and_create_fault(served: Any) -> None:
    em: Emulator = served.emulator
    file_id = add_input(em, [chat_line(1)])
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    with httpx.Client(base_url=served.url, headers=AUTH) as http:
        batch_id = http.post("/v1/batches", json=body).json()["id"]
        em.script(batch_id, fail_next_calls=2)
        codes = [http.get(f"/v1/batches/{batch_id}").status_code for _ in range(3)]
        assert codes == [500, 500, 200]
        # The remote creates the batch but the answer is lost: recovery must find it.
        em.script_next({"local_id": "b-7"}, create_fault="500")
        lost = http.post("/v1/batches", json={**body, "metadata": {"local_id": "b-7"}})
        assert lost.status_code == 500
        em.script_next({"local_id": "b-8"}, create_fault="drop")
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            http.post("/v1/batches", json={**body, "metadata": {"local_id": "b-8"}})
    metas = [b["metadata"] for b in em.batches()]
    assert {"local_id": "b-7"} in metas and {"local_id": "b-8"} in metas


def test_control_api_over_http(served: Any) -> None:
    em: Emulator = served.emulator
    file_id = add_input(em, [chat_line(i) for i in range(10)])
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    with httpx.Client(base_url=served.url) as http:  # no key needed for /_emulator/
        r = http.post("/_emulator/script-next", json={"match_metadata": {"k": "v"}, "fail": "x"})
        assert r.status_code == 200
        failing = http.post("/v1/batches", json={**body, "metadata": {"k": "v"}}, headers=AUTH)
        stuck = http.post("/v1/batches", json=body, headers=AUTH).json()["id"]
        r = http.post(f"/_emulator/batches/{stuck}/script", json={"stick_in": "finalizing"})
        assert r.status_code == 200 and r.json()["id"] == stuck
        assert http.post("/_emulator/clock/advance", json={"seconds": 7200}).status_code == 200
        got = {b["id"]: b for b in http.get("/_emulator/batches").json()["data"]}
        assert got[failing.json()["id"]]["status"] == "failed"
        assert got[stuck]["status"] == "finalizing"
        http.post(f"/_emulator/batches/{stuck}/script", json={"stick_in": None})
        r = http.post("/_emulator/faults", json={"500": 1.0})
        assert r.status_code == 200 and r.json()["fault_500"] == 1.0
        assert http.get("/v1/batches", headers=AUTH).status_code == 500
        assert http.get("/_emulator/stats").status_code == 200  # never faulted
        http.post("/_emulator/faults", json={"fault_500": 0})
        stats = http.get("/_emulator/stats").json()
        assert stats["batches_created"] == 2 and stats["calls"]["POST /v1/batches"] == 2
        assert http.post("/_emulator/faults", json={"nope": 1}).status_code == 400
        assert http.post("/_emulator/faults", json={"fault_500": 2}).status_code == 400
        r = http.post(f"/_emulator/batches/{stuck}/script", json={"explode": True})
        assert r.status_code == 400
        assert http.post("/_emulator/batches/batch_x/script", json={}).status_code == 404
    em.settle()
    assert em.get_batch(stuck)["status"] == "completed"
