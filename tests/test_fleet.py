"""A fleet on PostgreSQL, end to end: three `jobqueue run` processes on one database against the
emulator, with a slow remote and a short lease, SIGKILLed during submission and restarted. Every
local batch ends with exactly one adopted remote batch, every other remote batch naming one of
ours (an orphan) is cancelled or swept, and the results are complete and in input order."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from jobqueue.emulator import EmulatorConfig, serve_in_thread
from tests.daemon_helpers import API_KEY, make_queue, wait_until
from tests.factories import chat_file
from tests.test_daemon_process import _daemon_env, _start, _terminate

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
ENDPOINT = "/v1/chat/completions"
REQUESTS, PER_BATCH = 2_000, 100  # 20 local batches


def test_three_daemons_killed_during_submission_make_one_remote_batch_each(
    postgres_url: str, tmp_path: Path
) -> None:
    rng = random.Random(10)
    # Every call slow now and then; batches that take seconds to run, so that an orphan is
    # still open when the sweep finds it.
    config = EmulatorConfig(
        time_scale=60, seed=10, api_key=API_KEY, validating_seconds=60, finalizing_seconds=60,
        requests_per_minute=20.0, fault_slow=0.3, slow_seconds=2.0,
    )  # fmt: skip
    with serve_in_thread(config) as em:
        jq = make_queue(postgres_url, tmp_path / "data", em.base_url)
        source = chat_file(tmp_path / "in.jsonl", REQUESTS)
        job = jq.submit(source, ENDPOINT, max_batch_requests=PER_BATCH)
        local_ids = {b.id for b in job.batches}
        assert len(local_ids) == REQUESTS // PER_BATCH
        env = {
            **_daemon_env(postgres_url, tmp_path / "data", em.base_url),
            "JOBQUEUE_LEASE_SECONDS": "10", "JOBQUEUE_REQUEST_TIMEOUT": "3",
            "JOBQUEUE_MAX_RETRIES": "1", "JOBQUEUE_POLL_INTERVAL": "0.5",
            "JOBQUEUE_LIST_THRESHOLD": "0",
        }  # fmt: skip
        logs = [tmp_path / f"daemon-{i}.log" for i in range(3)]
        procs: list[subprocess.Popen] = [_start(env, log) for log in logs]
        kills = 0
        try:
            # Kill one daemon at a time while batches are being submitted, and start it again.
            for _ in range(8):
                time.sleep(rng.uniform(0.8, 2.0))
                if all(b.status != "queued" and b.status != "submitting"
                       for b in jq.get(job.id).batches):  # fmt: skip
                    break
                victim = rng.randrange(3)
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait(10)
                kills += 1
                procs[victim] = _start(env, logs[victim])
            final = jq.wait(job.id, timeout=90)
            assert kills >= 3
            assert final.status == "completed", final.to_dict()

            def ours() -> list[dict]:
                return [
                    b for b in em.emulator.batches()
                    if (b.get("metadata") or {}).get("jobqueue_batch_id") in local_ids
                ]  # fmt: skip

            adopted = {b.id: b.remote_id for b in final.batches}
            assert set(adopted) == local_ids  # no retry batch: every request ran once
            assert len(set(adopted.values())) == len(local_ids)
            remote_of = {b["id"]: b for b in ours()}
            for local_id, remote_id in adopted.items():
                assert remote_of[remote_id]["metadata"]["jobqueue_batch_id"] == local_id
            orphan_ids = set(remote_of) - set(adopted.values())

            def swept() -> bool:
                files = {f["id"] for f in em.emulator.list_files(limit=10_000)["data"]}
                for b in ours():
                    if b["id"] not in orphan_ids:
                        continue
                    if b["status"] in ("validating", "in_progress", "finalizing"):
                        return False  # not cancelled (yet)
                    if b["status"] != "cancelling" and (
                        b.get("output_file_id") in files or b.get("error_file_id") in files
                    ):
                        return False  # ended, its files not deleted yet
                return True

            wait_until(swept, timeout=30)
            records = list(jq.results(job.id))
            assert [r["custom_id"] for r in records] == [f"req-{i}" for i in range(REQUESTS)]
            assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in records)
            assert final.request_counts.completed == REQUESTS
        finally:
            for proc, log in zip(procs, logs, strict=True):
                if proc.poll() is None:
                    assert _terminate(proc, log) == 0, log.read_text()[-3000:]
            jq.close()
