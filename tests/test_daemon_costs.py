"""What a job will cost and what it cost, end to end: the real daemon against the emulator (over
loopback), on SQLite and PostgreSQL, with a fixed price table from the config and a command
hook. The hook gets the queued events with the estimate and the end events with usage and cost;
the cost is the emulator's own usage at the fixed prices, worked out here; `jobqueue cost
--json`, `status --json` and the API's `Job` say the same."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from jobqueue import tokens
from jobqueue.api import JobQueue
from jobqueue.cli.app import main
from jobqueue.emulator import EmulatorConfig, serve_in_thread
from tests.daemon_helpers import API_KEY, wait_until
from tests.factories import write_jsonl

ENDPOINT = "/v1/chat/completions"
MODEL = "fixed-model"
IN, CACHED, OUT = 2.0, 0.5, 8.0  # USD per million tokens
MAX_TOKENS = 40
# Long enough to be cached by the emulator's prompt caching (prefixes of 1,024 tokens or more).
SYSTEM = "You follow the house style guide to the letter. " * 120

HOOK = """import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(json.load(sys.stdin)) + "\\n")
"""


def _lines(n: int) -> list[dict[str, Any]]:
    lines = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Say {i} in a few words"}]
        if i % 2 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": ENDPOINT, "body": body})
    return lines


def _usd(input_tokens: int, cached: int, output: int) -> float:
    """The fixed prices applied by hand: uncached input, cached input, output (reasoning in)."""
    return ((input_tokens - cached) * IN + cached * CACHED + output * OUT) / 1e6


def _remote_usage(batch: dict[str, Any]) -> tuple[int, int, int]:
    usage = batch["usage"]
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens", 0)
    return usage["input_tokens"], cached, usage["output_tokens"]


@pytest.mark.timeout(120)
def test_hooks_cli_and_api_tell_what_a_job_will_cost_and_what_it_cost(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    received = tmp_path / "events.jsonl"
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    config = tmp_path / "jobqueue.toml"
    config.write_text(f"""
[prices."{MODEL}"]
input = {IN}
cached_input = {CACHED}
output = {OUT}

[[hooks]]
events = ["*"]
command = "{sys.executable} {hook} {received}"
timeout = 20
""")
    lines = _lines(30)
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    data_dir = tmp_path / "data"
    # Some requests fail with a 500: retried in a batch of their own, estimated as well.
    em_config = EmulatorConfig(time_scale=3600, seed=7, api_key=API_KEY, request_failure_rate=0.1)
    with serve_in_thread(em_config) as em:
        jq = JobQueue(
            database_url=db_url, data_dir=data_dir, config=config, base_url=em.base_url,
            api_key=API_KEY, poll_interval=0.2, lease_seconds=5.0,
        )  # fmt: skip
        try:
            # A budget well above the cost: every request is estimated (without one, a sample).
            job = jq.submit(source, ENDPOINT, max_batch_requests=10, max_cost=100.0)
            jq.start()
            job = jq.wait(job.id, timeout=60)
            assert job.status == "completed"
            stored = len(jq.events(job.id))
            wait_until(
                lambda: received.exists() and len(received.read_text().splitlines()) >= stored
            )
        finally:
            jq.close()
        remote = [b for b in em.emulator.batches() if b["status"] == "completed"]

    events = [json.loads(line) for line in received.read_text().splitlines()]
    assert API_KEY not in received.read_text()
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)

    # -- what it will cost: the queued events ---------------------------------------------
    expected_in = sum(tokens.input_tokens(ENDPOINT, line["body"]) for line in lines)
    (queued,) = by_type["job.queued"]
    assert queued["data"]["estimated_input_tokens"] == expected_in
    assert queued["data"]["max_output_tokens"] == 30 * MAX_TOKENS
    assert queued["data"]["estimated_cost"] == {
        "min": pytest.approx(_usd(expected_in, 0, 0)),
        "max": pytest.approx(_usd(expected_in, 0, 30 * MAX_TOKENS)),
    }
    batches_queued = [e for e in by_type["batch.queued"] if e["data"]["attempt"] == 1]
    retries = [e for e in by_type["batch.queued"] if e["data"]["attempt"] > 1]
    assert len(batches_queued) == 3 and retries
    for event in by_type["batch.queued"]:
        data = event["data"]
        requests = data["request_counts"]["total"]
        assert data["max_output_tokens"] == requests * MAX_TOKENS
        assert 0 < data["estimated_input_tokens"] < expected_in
    for event in retries:  # the retried requests' own estimate, not the shard's bytes / 4
        shard = data_dir / "jobs" / job.id / "input" / f"retry-{event['batch_id']}.jsonl"
        bodies = [json.loads(line)["body"] for line in shard.read_text().splitlines()]
        assert len(bodies) == event["data"]["request_counts"]["total"]
        assert event["data"]["estimated_input_tokens"] == sum(
            tokens.input_tokens(ENDPOINT, body) for body in bodies
        )
        assert data["estimated_cost"]["min"] == pytest.approx(
            _usd(data["estimated_input_tokens"], 0, 0)
        )
        assert data["estimated_cost"]["max"] == pytest.approx(
            _usd(data["estimated_input_tokens"], 0, requests * MAX_TOKENS)
        )
    assert sum(e["data"]["estimated_input_tokens"] for e in batches_queued) == expected_in

    # -- what it cost: the end events, from the emulator's own usage ----------------------
    assert len(remote) == 3 + len(retries)
    tokens_in = sum(_remote_usage(b)[0] for b in remote)
    tokens_cached = sum(_remote_usage(b)[1] for b in remote)
    tokens_out = sum(_remote_usage(b)[2] for b in remote)
    assert tokens_in and tokens_cached and tokens_out  # each price is exercised
    cost = _usd(tokens_in, tokens_cached, tokens_out)
    by_remote_id = {b["id"]: b for b in remote}
    ended = by_type["batch.completed"]
    assert len(ended) == len(remote)
    for event in ended:
        theirs = by_remote_id[event["data"]["remote_id"]]
        assert event["data"]["usage_source"] == "remote"
        assert event["data"]["cost"] == pytest.approx(_usd(*_remote_usage(theirs)))
    (done,) = by_type["job.completed"]
    assert done["data"]["usage_source"] == "collected"
    assert done["data"]["usage"]["input_tokens"] == tokens_in
    assert done["data"]["usage"]["cached_input_tokens"] == tokens_cached
    assert done["data"]["usage"]["output_tokens"] == tokens_out
    assert done["data"]["cost"] == pytest.approx(cost)

    # -- the CLI and the API agree --------------------------------------------------------
    base = ["--database-url", db_url, "--data-dir", str(data_dir), "--config", str(config)]
    assert main([*base, "cost", job.id, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["cost"] == pytest.approx(cost)
    assert report["total"]["input_tokens"] == tokens_in and report["unpriced_models"] == []
    assert main([*base, "status", job.id, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["cost"] == pytest.approx(cost)
    assert status["usage"]["output_tokens"] == tokens_out
    for key in ("estimated_input_tokens", "max_output_tokens", "estimated_cost"):
        assert status[key] == queued["data"][key]
    assert sum(b["cost"] for b in status["batches"]) == pytest.approx(cost)
    assert main([*base, "status", job.id]) == 0
    shown = capsys.readouterr().out
    assert f"~{expected_in:,} tokens in, at most {30 * MAX_TOKENS:,} out" in shown
    assert main([*base, "status", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["cost"] == pytest.approx(cost)
    assert listed["estimated_cost"] == queued["data"]["estimated_cost"]
    with JobQueue(database_url=db_url, data_dir=data_dir, config=config) as again:
        api_job = again.get(job.id)
        assert api_job.cost == pytest.approx(cost)
        assert api_job.estimate is not None
        assert api_job.estimate.input_tokens == expected_in
        assert api_job.estimate.cost_min == pytest.approx(_usd(expected_in, 0, 0))
        assert api_job.estimate.cost_max == pytest.approx(_usd(expected_in, 0, 30 * MAX_TOKENS))
        (api_listed,) = again.jobs()
        assert api_listed.estimate == api_job.estimate
        assert again.cost_report([job.id]).cost == pytest.approx(cost)
