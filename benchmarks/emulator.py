"""Emulator benchmark: is the emulator ever the bottleneck?

    python benchmarks/emulator.py [--batches 10000] [--lines 1000000] [--page 100]

Runs `jobqueue emulator` in a child process on a loopback port (as a daemon would see it) and
measures, over real HTTP with one keep-alive httpx client:
- creating `--batches` batches (POST /v1/batches), then retrieving one among many;
- walking the whole batch list with `after` (`--page` a page), as a poller would;
- uploading a `--lines`-line input file, the time from create to `completed` at a huge time
  scale (so that the time is the validation and streaming output generation), the emulator
  process's RSS growth during it, and the download speed of the output file.
The time scale is 1e9 with an endless completion window: every lifecycle takes no simulated time,
so the figures are the emulator's own work (each created batch also runs to completion).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import psutil

MB = 1_000_000
AUTH = {"authorization": "Bearer bench"}


def write_input(path: Path, lines: int) -> int:
    with open(path, "wb", buffering=1 << 20) as f:
        for i in range(lines):
            f.write(
                orjson.dumps(
                    {
                        "custom_id": f"request-{i:08d}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "model": "gpt-4o-mini",
                            "messages": [
                                {"role": "system", "content": "You are terse."},
                                {"role": "user", "content": f"Summarise item number {i}."},
                            ],
                            "max_tokens": 50,
                        },
                    },
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )
    return path.stat().st_size


def bench_batches(http: httpx.Client, count: int, page: int) -> None:
    data = b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n'
    file_id = http.post(
        "/v1/files", files={"file": ("one.jsonl", data)}, data={"purpose": "batch"}
    ).json()["id"]
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    started = time.perf_counter()
    ids = []
    for i in range(count):
        r = http.post("/v1/batches", json={**body, "metadata": {"n": str(i)}})
        r.raise_for_status()
        ids.append(r.json()["id"])
    took = time.perf_counter() - started
    print(f"create {count} batches: {took:.2f} s ({count / took:,.0f}/s)")

    samples = []
    for batch_id in ids[:: max(1, count // 200)]:
        t0 = time.perf_counter()
        http.get(f"/v1/batches/{batch_id}").raise_for_status()
        samples.append(time.perf_counter() - t0)
    print(
        f"retrieve one of {count}: median {statistics.median(samples) * 1000:.2f} ms, "
        f"max {max(samples) * 1000:.2f} ms"
    )

    started = time.perf_counter()
    seen, pages, after = 0, 0, None
    while True:
        params: dict[str, str | int] = {"limit": page}
        if after:
            params["after"] = after
        listed = http.get("/v1/batches", params=params).json()
        pages += 1
        seen += len(listed["data"])
        if not listed["has_more"]:
            break
        after = listed["last_id"]
    took = time.perf_counter() - started
    assert seen == count, seen
    print(
        f"list walk: {seen} batches in {pages} pages of {page}: {took:.2f} s "
        f"({took / pages * 1000:.1f} ms a page)"
    )


def bench_large(http: httpx.Client, pid: int, lines: int, workdir: Path) -> None:
    path = workdir / "big.jsonl"
    size = write_input(path, lines)
    started = time.perf_counter()
    with open(path, "rb") as f:
        r = http.post("/v1/files", files={"file": ("big.jsonl", f)}, data={"purpose": "batch"})
    r.raise_for_status()
    took = time.perf_counter() - started
    print(f"upload {lines:,} lines, {size / MB:.0f} MB: {took:.2f} s ({size / MB / took:.0f} MB/s)")
    file_id = r.json()["id"]
    path.unlink()

    process = psutil.Process(pid)
    rss_before = process.memory_info().rss
    peak = rss_before
    started = time.perf_counter()
    batch = http.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    ).json()
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        peak = max(peak, process.memory_info().rss)
        batch = http.get(f"/v1/batches/{batch['id']}").json()
    took = time.perf_counter() - started
    assert batch["status"] == "completed", batch
    print(
        f"validate + generate {lines:,} lines: {took:.2f} s ({lines / took:,.0f} lines/s), "
        f"RSS growth {(peak - rss_before) / MB:.0f} MB"
    )

    out_id = batch["output_file_id"]
    size = http.get(f"/v1/files/{out_id}").json()["bytes"]
    for attempt in range(2):  # the first read may come from disk, the second from page cache
        started = time.perf_counter()
        got = 0
        with http.stream("GET", f"/v1/files/{out_id}/content") as r:
            for chunk in r.iter_raw(1 << 20):
                got += len(chunk)
        took = time.perf_counter() - started
        assert got == size
        print(
            f"download output ({size / MB:.0f} MB), run {attempt + 1}: {size / MB / took:.0f} MB/s"
        )


@contextmanager
def emulator_process(data_dir: Path, lines: int) -> Iterator[tuple[str, int]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        "import typer; from jobqueue.emulator.command import emulator_command; "
        "typer.run(emulator_command)"
    )
    argv = [sys.executable, "-c", code, "--port", str(port), "--log-level", "warning"]
    argv += ["--time-scale", "1e9", "--completion-window-seconds", "1e15"]
    argv += ["--data-dir", str(data_dir), "--max-requests", str(max(lines, 50_000))]
    argv += ["--max-bytes", str(1 << 40)]
    child = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/_emulator/stats").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url, child.pid
    finally:
        child.terminate()
        child.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--page", type=int, default=100)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="jobqueue-bench-") as tmp,
        emulator_process(Path(tmp) / "emulator", args.lines) as (url, pid),
        httpx.Client(base_url=url, headers=AUTH, timeout=600) as http,
    ):
        print(f"emulator at {url}/v1 (pid {pid})")
        if args.batches:
            bench_batches(http, args.batches, args.page)
        if args.lines:
            bench_large(http, pid, args.lines, Path(tmp))


if __name__ == "__main__":
    main()
