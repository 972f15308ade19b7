"""End-to-end benchmark: a 1,000,000-request embeddings job through `jobqueue run` and the emulator.

    python benchmarks/endtoend.py [--requests 1000000] [--batches 20] [--expire 0 8]
                                  [--concurrency N] [--database-url URL] [--dir DIR] [--keep]

The emulator serves on a loopback port in this process (time scale 1000, a huge
requests-per-minute rate, 40-dimension vectors: ~1.16 KB output lines, as `collect.py`); one
`jobqueue run` daemon runs in a subprocess on a fresh SQLite database (or `--database-url`, e.g.
a PostgreSQL schema of its own). The job (`--requests` embedding requests in `--batches`
shards) is submitted with `JobQueue.submit` in this process once the daemon is up, and timed
until it has `completed`: every batch uploaded, created, run, its output downloaded and
recorded. For each `--expire` value E, the first E batches created are scripted
(`script_next(expire_at_fraction=0.5)`) to expire half done, so their unfinished requests are
retried in new batches (retry shard writing, a second upload and create) as a real expiry would.

Printed per run: the spread of the create times (first to last `POST /v1/batches` of the
original batches, from the emulator's own `created_at`), the submit call, the total time from
submit to `completed`, and the daemon's peak RSS (`VmHWM` from `/proc`, read just before it is
stopped). `--concurrency` sets `JOBQUEUE_SUBMIT_CONCURRENCY` for the daemon (unset: its
default).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.collect import generate_embeddings

MB = 1_000_000
TIME_SCALE = 1000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss(pid: int) -> int:
    """The process's own high-water RSS in bytes (`VmHWM`)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def sample_rss(proc: subprocess.Popen[bytes], path: Path) -> None:
    """Write the daemon's RSS (MB: all, anonymous, file, shared) with the wall-clock time every
    0.1 s, until it exits."""
    with path.open("w") as out:
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                return
            kb = {
                x.split(":")[0]: int(x.split()[1]) // 1024
                for x in status.splitlines()
                if x.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:"))
            }
            out.write(
                f"{time.time():.2f} {kb['VmRSS']} anon {kb['RssAnon']} file {kb['RssFile']} "
                f"shmem {kb['RssShmem']}\n"
            )
            out.flush()
            time.sleep(0.1)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/metrics", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("daemon not listening after 60 s")


def run_one(source: Path, work: Path, expire: int, args: argparse.Namespace) -> dict[str, Any]:
    from jobqueue.api import JobQueue
    from jobqueue.emulator import EmulatorConfig
    from jobqueue.emulator.server import serve_in_thread

    run_dir = work / f"run-{expire}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    database_url = args.database_url or f"sqlite:///{run_dir / 'jobqueue.db'}"
    config = EmulatorConfig(
        time_scale=TIME_SCALE, seed=7, data_dir=run_dir / "emulator",
        validating_seconds=args.validating * TIME_SCALE, finalizing_seconds=1,
        requests_per_minute=60_000, embedding_dimensions=args.dimensions,
        completion_window_seconds=1e9,
    )  # fmt: skip
    proc: subprocess.Popen[bytes] | None = None
    with serve_in_thread(config) as em:
        if expire:
            em.emulator.script_next({}, times=expire, expire_at_fraction=0.5)
        options: dict[str, Any] = {
            "database_url": database_url,
            "data_dir": str(run_dir / "data"),
            "base_url": em.base_url,
            "api_key": "bench",
            "output_expires_after": 2_592_000,
            "log_level": "warning",
        }
        with JobQueue(**options) as jq:  # creates the database (migrations) before the daemon
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBQUEUE_", "OPENAI"))}
            env.update(
                JOBQUEUE_DATABASE_URL=database_url, JOBQUEUE_DATA_DIR=str(run_dir / "data"),
                JOBQUEUE_BASE_URL=em.base_url, OPENAI_API_KEY="bench",
                JOBQUEUE_POLL_INTERVAL="1", JOBQUEUE_LOG_LEVEL=args.log_level,
                JOBQUEUE_OUTPUT_EXPIRES_AFTER="2592000",
            )  # fmt: skip
            if args.concurrency is not None:
                env["JOBQUEUE_SUBMIT_CONCURRENCY"] = str(args.concurrency)
            log_path = run_dir / "daemon.log"
            try:
                # (`--wrapper SCRIPT`: the daemon runs as `python SCRIPT run …`, e.g. traced.)
                program = [str(args.wrapper)] if args.wrapper else ["-m", "jobqueue"]
                proc = subprocess.Popen(
                    [sys.executable, *program, "run", "--listen", f"127.0.0.1:{port}"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log_path.open("wb"),
                )
                wait_ready(url, proc)
                if args.sample:
                    threading.Thread(
                        target=sample_rss, args=(proc, args.sample), daemon=True
                    ).start()
                started = time.perf_counter()
                job = jq.submit(source, "/v1/embeddings", max_batch_requests=args.per_batch)
                submitted = time.perf_counter() - started
                done = jq.wait(job.id, timeout=args.timeout)
                total = time.perf_counter() - started
                if done.status != "completed":
                    raise RuntimeError(f"job ended {done.status}")
                rss = peak_rss(proc.pid)
            finally:
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
        remotes = em.emulator.batches()
    originals = remotes[: args.batches]
    created = sorted(float(em.emulator._batches[b["id"]].created_at) for b in originals)
    expired = sum(1 for b in remotes if b["status"] == "expired")
    result = {
        "expire": expire,
        "expired": expired,
        "remote_batches": len(remotes),
        "spread": created[-1] - created[0] if created else 0.0,
        "submit": submitted,
        "total": total,
        "rss": rss,
    }
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--dimensions", type=int, default=40)
    ap.add_argument("--expire", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--database-url", default=None)
    ap.add_argument(
        "--validating", type=float, default=5.0, help="real seconds each batch validates"
    )
    ap.add_argument("--sample", type=Path, default=None, help="write the daemon's RSS here")
    ap.add_argument("--log-level", default="warning", help="the daemon's")
    ap.add_argument("--wrapper", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    args.per_batch = -(-args.requests // args.batches)
    work = args.dir or Path(tempfile.mkdtemp(prefix="jobqueue-endtoend-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = work / "input.jsonl"
        if not source.exists():
            size = generate_embeddings(source, args.requests)
            print(f"input: {args.requests:,} requests, {size / MB:,.0f} MB", flush=True)
        for expire in args.expire:
            r = run_one(source, work, expire, args)
            print(
                f"expire {r['expire']}: {r['expired']} expired, {r['remote_batches']} remote "
                f"batches; create spread {r['spread']:.2f} s; submit {r['submit']:.2f} s; "
                f"total {r['total']:.1f} s; daemon peak RSS {r['rss'] / MB:.0f} MB",
                flush=True,
            )
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
