"""`shuffle_output`: output and error lines out of input order, the same set, the same order for
the same seed; and the emulator's imports stay within its bounds."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from jobqueue.emulator import Emulator, EmulatorConfig, outputs
from tests.test_emulator_helpers import add_input, chat_line, create, read_lines


def run(
    config: EmulatorConfig, count: int, expire_at: float | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(output lines, error lines) of one batch of `count` chat requests; with `expire_at`, the
    batch expires after that share of its requests (the rest go to the error file)."""
    with Emulator(config) as em:
        if expire_at is not None:
            em.script_next(expire_at_fraction=expire_at)
        batch = create(em, add_input(em, [chat_line(i) for i in range(count)]))
        em.advance(3600)
        batch = em.get_batch(batch["id"])
        assert batch["status"] == ("completed" if expire_at is None else "expired")
        errors = read_lines(em, batch["error_file_id"]) if batch["error_file_id"] else []
        return read_lines(em, batch["output_file_id"]), errors


def content(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """What a line says, by custom id, without the ids that name the batch."""
    out = {}
    for line in lines:
        body = (line["response"] or {}).get("body") or {}
        out[line["custom_id"]] = (body.get("choices"), body.get("usage"), line["error"])
    return out


def ids(lines: list[dict[str, Any]]) -> list[str]:
    return [line["custom_id"] for line in lines]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of 25 lines, so that a few hundred lines make many chunks to put in order."""
    monkeypatch.setattr(outputs, "SHUFFLE_CHUNK_LINES", 25)
    return 25


def test_shuffle_changes_the_order_but_not_the_lines(small_chunks: int) -> None:
    count = 400
    ordered_out, ordered_err = run(EmulatorConfig(time_scale=1.0, seed=3), count, 0.75)
    out, err = run(EmulatorConfig(time_scale=1.0, seed=3, shuffle_output=True), count, 0.75)
    assert len(ordered_out) == 300 and len(ordered_err) == 100
    position = {f"req-{i}": i for i in range(count)}
    assert ids(ordered_out) == sorted(ids(ordered_out), key=position.__getitem__)
    for shuffled, ordered in ((out, ordered_out), (err, ordered_err)):
        assert ids(shuffled) != ids(ordered)
        assert sorted(ids(shuffled)) == sorted(ids(ordered))
        assert content(shuffled) == content(ordered)
    # Lines move across chunks too, not only within one: some line lands more than a chunk
    # away from where it would be in order.
    where = {cid: i for i, cid in enumerate(ids(ordered_out))}
    assert max(abs(where[cid] - i) for i, cid in enumerate(ids(out))) > small_chunks


def test_shuffle_is_reproducible_by_seed(small_chunks: int) -> None:
    first, _ = run(EmulatorConfig(time_scale=1.0, seed=5, shuffle_output=True), 120)
    again, _ = run(EmulatorConfig(time_scale=1.0, seed=5, shuffle_output=True), 120)
    other, _ = run(EmulatorConfig(time_scale=1.0, seed=6, shuffle_output=True), 120)
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert sorted(ids(first)) == sorted(ids(other))


def test_a_small_batch_is_shuffled_within_its_one_chunk() -> None:
    out, _ = run(EmulatorConfig(time_scale=1.0, seed=1, shuffle_output=True), 30)
    assert ids(out) != [f"req-{i}" for i in range(30)]
    assert sorted(ids(out)) == sorted(f"req-{i}" for i in range(30))


def test_the_emulator_imports_nothing_of_jobqueue_but_its_own_modules() -> None:
    code = (
        "import sys, jobqueue.emulator, jobqueue.emulator.command; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('jobqueue'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    allowed = {"jobqueue", "jobqueue.httpserver", "jobqueue.version", "jobqueue.tokens"}
    assert "jobqueue.tokens" in loaded
    assert [m for m in loaded if m not in allowed and not m.startswith("jobqueue.emulator")] == []
    code = (
        "import sys, jobqueue.tokens; print(' '.join(m for m in sys.modules if 'jobqueue.' in m))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(loaded) == ["jobqueue.tokens", "jobqueue.version"]
