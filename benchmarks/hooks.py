"""Hook delivery benchmark: latency from a transition's commit to a local webhook receiver.

    python benchmarks/hooks.py [--events N] [--database-url URL] [--active-jobs K] [--rate R]

A writer thread creates jobs (each with one batch) and walks them through the lifecycle with
`Store.transition_batch` / `Store.transition_job`, one commit per transition, waking the
dispatcher after each. Jobs are stepped round-robin, `--active-jobs` at a time, so events of
several jobs are in flight together as in a real daemon. A `Dispatcher` with one signed
`WebhookSink` runs `run_forever` in a thread; the receiver (Starlette + uvicorn on 127.0.0.1:0)
verifies each signature and notes the arrival time. Latency = arrival - the event's
`created_at` (stamped in the transaction that wrote it, just before its commit). Every event is
delivered once: the run fails if one is missing or duplicated.

Defaults: 10,000 events on a fresh SQLite file (synchronous=FULL, as jobqueue runs it).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobqueue.core.ids import new_id
from jobqueue.hooks.dispatcher import Dispatcher
from jobqueue.hooks.signing import generate_secret, verify
from jobqueue.hooks.sinks import WebhookSink
from jobqueue.store import Store
from jobqueue.store.tables import events_table

# Each job yields 9 events: job.queued, batch.queued, 5 batch transitions, job.running/completed.
BATCH_PATH = ["queued", "submitting", "validating", "in_progress", "finalizing", "completed"]
EVENTS_PER_JOB = 9


class Receiver:
    """The webhook receiver, run in its own process (`--serve-receiver`) as a real one would be.

    POST /hook verifies the signature and notes the arrival time; GET /count and GET /arrivals
    report to the benchmark.
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.arrivals: dict[str, list[float]] = {}
        self.order: list[tuple[str, str]] = []  # (job_id, event_id) in arrival order
        self.rejected = 0

    async def hook(self, request: Request) -> Response:
        arrived = time.time()
        body = await request.body()
        try:
            verify(self.secret, request.headers, body)
        except Exception:
            self.rejected += 1
            return Response(status_code=400)
        event = orjson.loads(body)
        self.arrivals.setdefault(event["id"], []).append(arrived)
        self.order.append((event["job_id"], event["id"]))
        return Response(status_code=204)

    async def count(self, request: Request) -> Response:
        return Response(str(len(self.arrivals)))

    async def report(self, request: Request) -> Response:
        body = {"arrivals": self.arrivals, "order": self.order, "rejected": self.rejected}
        return Response(orjson.dumps(body), media_type="application/json")

    def serve(self) -> None:
        app = Starlette(
            routes=[
                Route("/hook", self.hook, methods=["POST"]),
                Route("/count", self.count),
                Route("/arrivals", self.report),
            ]
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        print(sock.getsockname()[1], flush=True)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        uvicorn.Server(config).run(sockets=[sock])


def start_receiver(secret: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-receiver"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(secret + "\n")
    proc.stdin.close()
    port = int(proc.stdout.readline())
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{base}/count", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    return proc, base


def _job(now: float) -> tuple[dict[str, Any], dict[str, Any]]:
    job_id, batch_id = new_id("job"), new_id("batch")
    job = {
        "id": job_id,
        "status": "queued",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "user_metadata": {},
        "max_attempts": 3,
        "source": "bench.jsonl",
        "input_dir": "/nonexistent",
        "max_batch_requests": 50_000,
        "max_batch_bytes": 200 * 1024 * 1024,
        "request_count": 10,
        "bytes": 1000,
        "created_at": now,
        "updated_at": now,
    }
    batch = {
        "id": batch_id,
        "job_id": job_id,
        "number": 1,
        "status": "queued",
        "shard_index": 0,
        "attempt": 1,
        "model": "gpt-4o-mini",
        "input_path": "/nonexistent/shard.jsonl",
        "request_count": 10,
        "bytes": 1000,
        "created_at": now,
        "updated_at": now,
    }
    return job, batch


def write_events(
    store: Store, dispatcher: Dispatcher, events: int, active: int, rate: float | None
) -> None:
    """Create and step jobs round-robin until `events` events were committed."""
    jobs_needed = -(-events // EVENTS_PER_JOB)
    started = 0
    written = 0
    # Each active job: [job_id, batch_id, step]; step 0 = not inserted yet.
    slots: list[list[Any]] = []
    begun = time.monotonic()

    def pace() -> None:
        if rate:
            ahead = written / rate - (time.monotonic() - begun)
            if ahead > 0:
                time.sleep(ahead)

    while written < events:
        while len(slots) < active and started < jobs_needed:
            slots.append([None, None, 0])
            started += 1
        if not slots:
            break
        for slot in list(slots):
            if written >= events:
                break
            step = slot[2]
            with store.write() as conn:
                if step == 0:
                    job, batch = _job(time.time())
                    job["number"] = store.next_job_number(conn)
                    store.insert_job(conn, job, [batch])
                    slot[0], slot[1] = job["id"], batch["id"]
                    written += 2
                elif step == 1:
                    store.transition_job(conn, slot[0], "queued", "running")
                    written += 1
                elif step <= len(BATCH_PATH):  # steps 2..6: the batch's five transitions
                    source, dest = BATCH_PATH[step - 2], BATCH_PATH[step - 1]
                    store.transition_batch(conn, slot[1], source, dest)
                    written += 1
                else:
                    store.transition_job(conn, slot[0], "running", "completed")
                    written += 1
                    slots.remove(slot)
            slot[2] = step + 1
            dispatcher.wake()
            pace()


def percentile(sorted_values: list[float], p: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def main() -> int:
    if sys.argv[1:] == ["--serve-receiver"]:
        Receiver(sys.stdin.readline().strip()).serve()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--database-url", help="default: a fresh SQLite file in a temp dir")
    parser.add_argument("--active-jobs", type=int, default=50, help="jobs stepped round-robin")
    parser.add_argument("--rate", type=float, help="events/s the writer aims at (default: max)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    url = args.database_url or f"sqlite:///{Path(tmp.name) / 'bench.db'}"
    store = Store(url)
    secret = generate_secret()
    receiver, base = start_receiver(secret)
    sink = WebhookSink(f"{base}/hook", secret, "*", timeout=5, name="webhook:bench")
    dispatcher = Dispatcher(
        store, [sink], "bench", workers=args.workers, batch_size=args.batch_size
    )
    dispatcher.run_once()  # the sink's cursor starts at the newest event: only new ones count
    with store.read() as conn:
        first_seq = int(
            conn.execute(
                select(events_table.c.seq).order_by(events_table.c.seq.desc()).limit(1)
            ).scalar()
            or 0
        )
    stop = threading.Event()
    runner = threading.Thread(target=dispatcher.run_forever, args=(stop, 1.0))
    runner.start()

    began = time.time()
    write_events(store, dispatcher, args.events, args.active_jobs, args.rate)
    written_at = time.time()
    with store.read() as conn:
        rows = conn.execute(
            select(
                events_table.c.seq,
                events_table.c.id,
                events_table.c.created_at,
                events_table.c.job_id,
            ).where(events_table.c.seq > first_seq)
        ).all()
    deadline = time.monotonic() + 120
    while int(httpx.get(f"{base}/count").text) < len(rows) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    runner.join()
    dispatcher.close()
    sink.close()
    report = httpx.get(f"{base}/arrivals", timeout=30).json()
    receiver.terminate()
    receiver.wait()
    store.close()
    arrivals: dict[str, list[float]] = report["arrivals"]

    missing = [r.id for r in rows if r.id not in arrivals]
    duplicated = [k for k, v in arrivals.items() if len(v) > 1]
    created = {r.id: r.created_at for r in rows}
    latencies = sorted(arrivals[i][0] - created[i] for i in created if i in arrivals)
    seq = {r.id: r.seq for r in rows}
    by_job: dict[str, list[int]] = {}
    for job_id, event_id in report["order"]:
        by_job.setdefault(job_id, []).append(seq[event_id])
    order_ok = all(seqs == sorted(seqs) for seqs in by_job.values())
    last_arrival = max(v[0] for v in arrivals.values())
    print(f"database      {store.dialect}  ({url if args.database_url else 'temp SQLite file'})")
    print(
        f"events        {len(rows):,} written in {written_at - began:.2f}s "
        f"({len(rows) / (written_at - began):,.0f}/s), {args.active_jobs} jobs at a time"
    )
    print(
        f"delivered     {len(latencies):,} in {last_arrival - began:.2f}s "
        f"({len(latencies) / (last_arrival - began):,.0f}/s); missing {len(missing)}, "
        f"duplicated {len(duplicated)}, rejected {report['rejected']}, "
        f"in order per job: {'yes' if order_ok else 'NO'}"
    )
    print("latency (commit -> receiver)")
    for name, value in (
        ("p50", statistics.median(latencies)),
        ("p95", percentile(latencies, 95)),
        ("p99", percentile(latencies, 99)),
        ("max", latencies[-1]),
    ):
        print(f"  {name:<4} {value * 1000:9.1f} ms")
    tmp.cleanup()
    return 0 if not missing and not duplicated and order_ok else 1


if __name__ == "__main__":
    sys.exit(main())
