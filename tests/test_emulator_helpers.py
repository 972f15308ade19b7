"""Shared helpers for the emulator tests (no tests here)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import pytest

from jobqueue.emulator import Emulator, EmulatorConfig

TERMINAL = {"completed", "failed", "expired", "cancelled"}
CHAT = "/v1/chat/completions"


def chat_line(i: int, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    line = {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": CHAT,
        "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]},
    }
    line.update(extra)
    return line


def jsonl(lines: Iterable[dict[str, Any] | str | bytes]) -> bytes:
    out = bytearray()
    for line in lines:
        if isinstance(line, dict):
            out += orjson.dumps(line)
        elif isinstance(line, str):
            out += line.encode()
        else:
            out += line
        out += b"\n"
    return bytes(out)


def add_input(em: Emulator, lines: Iterable[Any], filename: str = "in.jsonl") -> str:
    """Upload an input file straight into the engine; its id."""
    data = jsonl(lines)
    path = em.upload_path()
    path.write_bytes(data)
    return em.add_file(path, filename=filename, purpose="batch", size=len(data))["id"]


def create(em: Emulator, file_id: str, endpoint: str = CHAT, **extra: Any) -> dict[str, Any]:
    batch, fault = em.create_batch(
        {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", **extra}
    )
    assert fault is None
    return batch


def read_lines(em: Emulator, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    path, _size, _name = em.file_content(file_id)
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def wait_for(
    em: Emulator, batch_id: str, statuses: set[str] = TERMINAL, timeout: float = 10.0
) -> dict[str, Any]:
    """Poll in real time until the batch reaches one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        batch = em.get_batch(batch_id)
        if batch["status"] in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch stuck in {batch['status']}: {batch}")
        time.sleep(0.002)


@pytest.fixture
def manual() -> Iterator[Emulator]:
    """Real time barely moves (time scale 1): tests drive the clock with `advance`."""
    em = Emulator(EmulatorConfig(time_scale=1.0, seed=7))
    yield em
    em.close()


@pytest.fixture
def fast() -> Iterator[Emulator]:
    """A whole default lifecycle in a few tens of milliseconds; the window lasts 8.6 s."""
    em = Emulator(EmulatorConfig(time_scale=10_000.0, seed=7))
    yield em
    em.close()
