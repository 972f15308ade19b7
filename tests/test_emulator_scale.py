"""Scale: many batches stay cheap to read and list; big outputs are generated as a stream."""

from __future__ import annotations

import time
import tracemalloc

import orjson
import pytest

from jobqueue.emulator import Emulator, EmulatorConfig
from jobqueue.emulator.outputs import OutputPlan, generate
from tests.test_emulator_helpers import add_input, chat_line, create


@pytest.mark.slow
def test_ten_thousand_batches_list_and_read_in_constant_time_per_call() -> None:
    with Emulator(EmulatorConfig(time_scale=1.0)) as em:
        file_id = add_input(em, [chat_line(1)])
        ids = [create(em, file_id)["id"] for _ in range(100)]

        def timed_calls() -> float:
            started = time.perf_counter()
            for _ in range(50):
                em.list_batches(limit=100, after=ids[50])
                em.get_batch(ids[10])
            return time.perf_counter() - started

        small = timed_calls()
        ids += [create(em, file_id)["id"] for _ in range(9_900)]
        large = timed_calls()
        assert large < small * 3 + 0.05  # 100 times the batches, about the same cost a call
        walked, after = 0, None
        while True:
            page = em.list_batches(limit=100, after=after)
            walked += len(page["data"])
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert walked == 10_000


@pytest.mark.slow
def test_output_generation_streams_in_constant_memory() -> None:
    with Emulator(EmulatorConfig()) as em:
        lines = 20_000  # tracemalloc makes every allocation slow
        file_id = add_input(em, (chat_line(i) for i in range(lines)))
        record = em._files[file_id]
        plan = OutputPlan(
            input_path=record.path,
            output_path=em.files_dir / "out.part",
            error_path=em.files_dir / "err.part",
            endpoint="/v1/chat/completions",
            batch_id="batch_test",
            model="gpt-4o-mini",
            created=1,
            finished=lines - 1000,
            unfinished_code="batch_expired",
            failure_rate=0.0,
            seed=0,
            embedding_dimensions=8,
        )
        tracemalloc.start()
        result = generate(plan)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert result.completed == lines - 1000 and result.failed == 1000
        assert result.output_bytes > 10_000_000
        assert peak < 5_000_000  # buffers only, nothing per line kept
        with open(em.files_dir / "err.part", "rb") as f:
            assert orjson.loads(f.readline())["error"]["code"] == "batch_expired"
