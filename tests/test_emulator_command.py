"""`jobqueue emulator` as a process: the SDK's batch example against it, unchanged but base_url."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import orjson
import typer
from typer.testing import CliRunner

from jobqueue.emulator.command import emulator_command
from tests.test_emulator_helpers import TERMINAL, chat_line, jsonl

CODE = (
    "import typer; from jobqueue.emulator.command import emulator_command; "
    "typer.run(emulator_command)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_help_lists_every_option() -> None:
    app = typer.Typer()
    app.command()(emulator_command)
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in (
        "--host", "--port", "--time-scale", "--seed", "--data-dir", "--api-key",
        "--validating-seconds", "--requests-per-minute", "--finalizing-seconds",
        "--cancelling-seconds", "--completion-window-seconds", "--enqueued-token-limit",
        "--request-failure-rate", "--fault-500", "--fault-429", "--fault-drop", "--fault-slow",
        "--fault-cut-download", "--webhook-url", "--webhook-secret", "--embedding-dimensions",
        "--shuffle-output",
    ):  # fmt: skip
        assert flag in result.output, flag


def test_bad_options_are_refused() -> None:
    app = typer.Typer()
    app.command()(emulator_command)
    assert CliRunner().invoke(app, ["--fault-500", "2"]).exit_code != 0
    assert CliRunner().invoke(app, ["--webhook-url", "http://x"]).exit_code != 0


def test_command_serves_the_sdk_batch_example(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-c", CODE, "--port", str(port), "--time-scale", "3600"]
    argv += ["--data-dir", str(tmp_path / "data"), "--log-level", "warning"]
    argv += ["--shuffle-output", "--seed", "5"]
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/_emulator/stats").raise_for_status()
                break
            except httpx.HTTPError:
                assert child.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        client = openai.OpenAI(api_key="sk-x", base_url=f"http://127.0.0.1:{port}/v1")
        (tmp_path / "batchinput.jsonl").write_bytes(jsonl(chat_line(i) for i in range(20)))
        with open(tmp_path / "batchinput.jsonl", "rb") as f:
            batch_input_file = client.files.create(file=f, purpose="batch")
        batch = client.batches.create(
            input_file_id=batch_input_file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"description": "nightly eval job"},
        )
        while batch.status not in TERMINAL:
            assert time.monotonic() < deadline + 20
            time.sleep(0.05)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed"
        assert batch.expires_at is not None and batch.expires_at - batch.created_at in (23, 24, 25)
        text = client.files.content(batch.output_file_id or "").text
        lines = [orjson.loads(x) for x in text.splitlines()]
        ids = [x["custom_id"] for x in lines]
        in_order = [f"req-{i}" for i in range(20)]
        assert sorted(ids) == sorted(in_order) and ids != in_order  # --shuffle-output
        assert batch.usage is not None
        assert batch.usage.input_tokens == sum(
            x["response"]["body"]["usage"]["prompt_tokens"] for x in lines
        )
        assert (tmp_path / "data" / "files" / batch_input_file.id).exists()
        client.close()
    finally:
        child.terminate()
        _, err = child.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}/v1" in err
    assert child.returncode == 0
