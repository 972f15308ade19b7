"""Hooks through the running daemon: a Python callback and a shell command get every state
change of a job, in order, at least once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobqueue.emulator import EmulatorConfig, serve_in_thread
from jobqueue.settings import HookConfig
from tests.daemon_helpers import API_KEY, make_queue, wait_until
from tests.factories import chat_file


def test_callback_and_command_get_every_event_in_order(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "hook.log"
    command = (
        f"{sys.executable} -c \"import os,sys; open({str(log)!r},'a').write("
        "os.environ['JOBQUEUE_EVENT_TYPE']+' '+sys.stdin.read()+'\\n')\""
    )
    with serve_in_thread(EmulatorConfig(time_scale=3600, seed=31, api_key=API_KEY)) as em:
        jq = make_queue(
            db_url, tmp_path / "data", em.base_url,
            hooks=[HookConfig(events=["job.*"], command=command, timeout=20)],
        )  # fmt: skip
        seen: list[dict] = []
        failures = {"left": 2}

        @jq.on("*")
        def record(event: dict) -> None:
            if failures["left"]:  # the first two attempts fail: retried, never lost
                failures["left"] -= 1
                raise RuntimeError("not yet")
            seen.append(event)

        try:
            job = jq.submit(chat_file(tmp_path / "in.jsonl", 40), "/v1/chat/completions",
                            max_batch_requests=20)  # fmt: skip
            jq.start()
            job = jq.wait(job.id, timeout=60)
            stored = [e.id for e in jq.events(job.id)]
            wait_until(lambda: len(seen) >= len(stored))
            assert [e["id"] for e in seen] == stored  # every event once, in order
            assert seen[0]["type"] == "job.queued" and seen[-1]["type"] == "job.completed"
            assert set(seen[-1]) == {"id", "type", "created_at", "job_id", "batch_id", "from",
                                     "to", "data"}  # fmt: skip
            assert API_KEY not in json.dumps(seen)
            wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 3)
            lines = log.read_text().splitlines()
            types = [line.split(" ", 1)[0] for line in lines]
            assert types == ["job.queued", "job.running", "job.completed"]
            assert json.loads(lines[-1].split(" ", 1)[1])["job_id"] == job.id
        finally:
            jq.close()
