"""Scale-out benchmark: remote calls per reconcile cycle and time to finish jobs, with 1, 2 and 4
daemons on one PostgreSQL database.

    python benchmarks/scaleout.py [--batches 1000 10000] [--daemons 1 2 4] [--intervals 2]
                                  [--jobs 10] [--postgres URL]

For each number of open batches N and each number of daemons K, on a fresh schema of the
PostgreSQL database (`JOBQUEUE_TEST_POSTGRES_URL`, else the local default) and a fresh emulator
on a loopback port (time scale 1):

1. N remote batches are created straight in the emulator's engine, held (`stick_in`) in
   `validating` or `in_progress`, each with the metadata jobqueue gives its own, and N matching
   local rows are inserted (one job, bulk insert), as `benchmarks/reconcile.py` does.
2. K `jobqueue run --listen` subprocesses start on that database. Once the first reconcile
   cycle has ended, the emulator's per-route call counts (`GET /_emulator/stats`) are read over
   `--intervals` poll intervals: reconcile's calls (`GET /v1/batches`, `GET /v1/batches/{id}`)
   per poll interval are the calls a cycle of the fleet costs. The poll interval is chosen
   longer than one cycle takes (5 s for 1,000 open batches, 30 s for 10,000), so that a daemon
   that reconciles does it once an interval. The daemons' `/metrics` give the cycles each ran.
3. Then `--jobs` jobs of 5 batches (20 requests each) are submitted through the API and timed
   until every one has completed: submitted, validated, run, collected by the fleet; `--rounds`
   times, the median reported. A batch ends seconds after it is created, and the fleet learns
   of it at the next reconcile cycle (woken by every adoption, else every poll interval), so
   with 10,000 open batches, whose cycle takes seconds, this time depends on where in the poll
   interval the last batches end: hence the rounds.

Prints one row per run. Runs take a few minutes in all (the 10,000-batch ones most of it).
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
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
RECONCILE_ROUTES = ("GET /v1/batches", "GET /v1/batches/{id}")
ENDPOINT = "/v1/chat/completions"


def poll_interval_for(batches: int) -> float:
    return 5.0 if batches <= 2_000 else 30.0


def make_open_batches(emulator: Any, work: Path, count: int) -> list[dict[str, Any]]:
    """N remote batches on one input file, half held in validating, half in in_progress, each
    naming a local batch and job in its metadata (ids made here, rows inserted later)."""
    from jobqueue.core.ids import new_id

    source = work / "one.jsonl"
    source.write_bytes(
        orjson.dumps(
            {
                "custom_id": "request-0",
                "method": "POST",
                "url": ENDPOINT,
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
    )
    file = emulator.add_file(
        source, filename="one.jsonl", purpose="batch", size=source.stat().st_size
    )
    job_id = new_id("job")
    created = []
    for i in range(count):
        local_id = new_id("batch")
        batch, _fault = emulator.create_batch(
            {
                "input_file_id": file["id"],
                "endpoint": ENDPOINT,
                "completion_window": "24h",
                "metadata": {"jobqueue_batch_id": local_id, "jobqueue_job_id": job_id},
            }
        )
        emulator.script(batch["id"], stick_in="validating" if i % 2 == 0 else "in_progress")
        created.append({**batch, "local_id": local_id, "job_id": job_id})
    return created


def insert_local_rows(store: Any, remotes: list[dict[str, Any]]) -> None:
    """The job and a batch row per remote batch, in the status the remote holds it in."""
    from sqlalchemy import insert

    from jobqueue.store.tables import batches_table, jobs_table

    now = time.time()
    rows = []
    for i, remote in enumerate(remotes):
        status = "validating" if i % 2 == 0 else "in_progress"
        created = float(remote["created_at"])
        rows.append(
            {
                "id": remote["local_id"],
                "job_id": remote["job_id"],
                "number": i + 1,
                "status": status,
                "shard_index": i,
                "attempt": 1,
                "model": "gpt-4o-mini",
                "input_path": "",
                "request_count": 1,
                "bytes": 100,
                "remote_id": remote["id"],
                "input_file_id": remote["input_file_id"],
                "created_at": created,
                "updated_at": now,
                "submitting_at": created,
                "validating_at": created,
                "in_progress_at": created if status == "in_progress" else None,
                "expires_at": float(remote["expires_at"]),
            }
        )
    with store.write() as conn:
        conn.execute(
            insert(jobs_table).values(
                id=remotes[0]["job_id"],
                number=store.next_job_number(conn),
                status="running",
                endpoint=ENDPOINT,
                user_metadata={},
                max_batch_requests=50_000,
                max_batch_bytes=200 * 1024 * 1024,
                request_count=len(rows),
                bytes=100 * len(rows),
                created_at=now,
                updated_at=now,
                started_at=now,
            )
        )
        for start in range(0, len(rows), 2_000):
            conn.execute(insert(batches_table), rows[start : start + 2_000])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(url: str, name: str) -> float:
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def reconcile_calls(emulator: Any) -> int:
    calls = emulator.stats()["calls"]
    return sum(calls.get(route, 0) for route in RECONCILE_ROUTES)


def write_jobs(work: Path, jobs: int) -> list[Path]:
    paths = []
    for j in range(jobs):
        path = work / f"job-{j}.jsonl"
        with path.open("wb") as f:
            for i in range(100):
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{i}"}]}
                line = {"custom_id": f"r{i}", "method": "POST", "url": ENDPOINT, "body": body}
                f.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        paths.append(path)
    return paths


def run_one(pg_base: str, batches: int, daemons: int, args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from jobqueue.api import JobQueue
    from jobqueue.emulator import EmulatorConfig
    from jobqueue.emulator.server import serve_in_thread

    work = Path(tempfile.mkdtemp(prefix="jobqueue-scaleout-"))
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = (
        make_url(pg_base)
        .update_query_dict({"options": f"-csearch_path={schema}"})
        .render_as_string(hide_password=False)
    )
    poll = poll_interval_for(batches)
    config = EmulatorConfig(
        time_scale=1.0, seed=7, data_dir=work / "emulator", validating_seconds=1,
        finalizing_seconds=1, requests_per_minute=60_000,
    )  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with serve_in_thread(config) as em:
            started = time.perf_counter()
            remotes = make_open_batches(em.emulator, work, batches)
            em.emulator.settle()
            time.sleep(config.real(config.validating_seconds) + 0.5)
            jq = JobQueue(database_url=url, data_dir=work / "data", base_url=em.base_url,
                          api_key="bench", log_level="warning")  # fmt: skip
            insert_local_rows(jq.store, remotes)
            setup = time.perf_counter() - started
            env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBQUEUE_", "OPENAI"))}
            env.update(
                JOBQUEUE_DATABASE_URL=url, JOBQUEUE_DATA_DIR=str(work / "data"),
                JOBQUEUE_BASE_URL=em.base_url, OPENAI_API_KEY="bench",
                JOBQUEUE_POLL_INTERVAL=str(poll), JOBQUEUE_LOG_LEVEL="warning",
            )  # fmt: skip
            urls = []
            for i in range(daemons):
                port = free_port()
                urls.append(f"http://127.0.0.1:{port}")
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "jobqueue", "run", "--listen", f"127.0.0.1:{port}"],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=(work / f"daemon-{i}.log").open("wb"),
                    )
                )
            # Warm-up: the first cycle (and the orphan sweep's first walk) has ended.
            deadline = time.monotonic() + 300
            while sum(metric(u, "jobqueue_reconcile_cycles_total") for u in urls) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("no reconcile cycle in 300 s")
                time.sleep(0.2)
            cycles_before = [metric(u, "jobqueue_reconcile_cycles_total") for u in urls]
            seconds_before = sum(metric(u, "jobqueue_reconcile_seconds_total") for u in urls)
            calls_before = reconcile_calls(em.emulator)
            window = args.intervals * poll
            time.sleep(window)
            calls = reconcile_calls(em.emulator) - calls_before
            cycles = [
                metric(u, "jobqueue_reconcile_cycles_total") - before
                for u, before in zip(urls, cycles_before, strict=True)
            ]
            cycle_seconds = (
                sum(metric(u, "jobqueue_reconcile_seconds_total") for u in urls) - seconds_before
            ) / max(1.0, sum(cycles))
            leaders = [u for u in urls if metric(u, "jobqueue_leader") == 1.0]

            sources = write_jobs(work, args.jobs)
            finishes = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                job_ids = [jq.submit(path, ENDPOINT, max_batch_requests=20).id for path in sources]
                for job_id in job_ids:
                    job = jq.wait(job_id, timeout=600)
                    if job.status != "completed":
                        raise RuntimeError(f"{job_id} ended {job.status}")
                finishes.append(time.perf_counter() - started)
            jq.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "batches": batches,
        "daemons": daemons,
        "poll": poll,
        "setup": setup,
        "calls_per_interval": calls / args.intervals,
        "cycles": cycles,
        "cycle_seconds": cycle_seconds,
        "leaders": len(leaders),
        "finish": sorted(finishes)[len(finishes) // 2],
        "finishes": finishes,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1_000, 10_000])
    ap.add_argument("--daemons", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--intervals", type=int, default=2, help="poll intervals measured")
    ap.add_argument("--jobs", type=int, default=10, help="jobs of 5 batches timed to the end")
    ap.add_argument("--rounds", type=int, default=3, help="times the jobs are run (median)")
    ap.add_argument("--postgres", default=os.environ.get("JOBQUEUE_TEST_POSTGRES_URL", DEFAULT_PG))
    args = ap.parse_args(argv)
    results = []
    for batches in args.batches:
        for daemons in args.daemons:
            row = run_one(args.postgres, batches, daemons, args)
            results.append(row)
            print(
                f"{batches:>6,} open, {daemons} daemon(s): "
                f"{row['calls_per_interval']:,.0f} reconcile calls per {row['poll']:g} s interval, "
                f"cycles per daemon {[int(c) for c in row['cycles']]} "
                f"({row['cycle_seconds']:.1f} s each), "
                f"{row['leaders']} leader, {args.jobs} jobs finished in "
                f"{', '.join(f'{x:.1f}' for x in row['finishes'])} s",
                flush=True,
            )
    print(
        f"\n| open batches | daemons | poll s | reconcile calls / cycle | vs 1 daemon "
        f"| cycles run (per daemon) | s / cycle | {args.jobs} jobs finished in s (median) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    base: dict[int, dict[str, Any]] = {}
    for r in results:
        first = base.setdefault(r["batches"], r)
        ratio = r["calls_per_interval"] / first["calls_per_interval"]
        print(
            f"| {r['batches']:,} | {r['daemons']} | {r['poll']:g} | "
            f"{r['calls_per_interval']:,.0f} | x{ratio:.2f} | "
            f"{', '.join(str(int(c)) for c in r['cycles'])} | {r['cycle_seconds']:.1f} | "
            f"{r['finish']:.1f} |"
        )


if __name__ == "__main__":
    main()
