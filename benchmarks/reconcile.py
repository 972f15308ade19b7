"""Reconcile benchmark: remote calls and seconds per reconcile cycle with many open batches.

    python benchmarks/reconcile.py [--batches N (default 10,000)] [--cycles C (default 3)]

Serves the emulator on a loopback port (time scale 1), uploads one small input file and creates
N batches straight in its engine, every other one held in `validating` and the rest in
`in_progress` (`stick_in`). A fresh jobqueue SQLite database gets one job and N matching batch
rows (bulk insert, with their remote ids). Then `reconcile_once` runs C cycles with the default
`list_threshold` (walking list pages) and C cycles with it forced high (one retrieve per batch).
Calls per cycle come from the emulator's per-route counters and from
`ctx.stats["last_cycle_calls"]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_open_batches(emulator: Any, work: Path, count: int) -> list[dict[str, Any]]:
    """N remote batches on one input file, half held in validating, half in in_progress."""
    source = work / "one.jsonl"
    source.write_bytes(
        orjson.dumps(
            {
                "custom_id": "request-0",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
    )
    file = emulator.add_file(
        source, filename="one.jsonl", purpose="batch", size=source.stat().st_size
    )
    created = []
    for i in range(count):
        batch, _fault = emulator.create_batch(
            {
                "input_file_id": file["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            }
        )
        emulator.script(batch["id"], stick_in="validating" if i % 2 == 0 else "in_progress")
        created.append(batch)
    return created


def insert_local_rows(store: Any, remotes: list[dict[str, Any]]) -> str:
    """One job and a batch row per remote batch, in the status the remote holds it in."""
    from jobqueue.core.ids import new_id

    now = time.time()
    job_id = new_id("job")
    rows = []
    for i, remote in enumerate(remotes):
        status = "validating" if i % 2 == 0 else "in_progress"
        created = float(remote["created_at"])
        rows.append(
            {
                "id": new_id("batch"),
                "job_id": job_id,
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
    insert_running_job(store, job_id, rows, requests=len(rows), size=100 * len(rows), now=now)
    return job_id


def insert_running_job(
    store: Any, job_id: str, rows: list[dict[str, Any]], *, requests: int, size: int, now: float
) -> None:
    """A `running` chat job of `requests` requests and `size` bytes, and its batch rows (a
    thousand a statement)."""
    from sqlalchemy import insert

    from jobqueue.store.tables import batches_table, jobs_table

    with store.write() as conn:
        conn.execute(
            insert(jobs_table).values(
                id=job_id,
                number=store.next_job_number(conn),
                status="running",
                endpoint="/v1/chat/completions",
                user_metadata={},
                max_batch_requests=50_000,
                max_batch_bytes=200 * 1024 * 1024,
                request_count=requests,
                bytes=size,
                created_at=now,
                updated_at=now,
                started_at=now,
            )
        )
        for start in range(0, len(rows), 1000):
            conn.execute(insert(batches_table), rows[start : start + 1000])


def run_cycles(ctx: Any, emulator: Any, cycles: int, label: str) -> list[dict[str, Any]]:
    from jobqueue.duties.reconcile import reconcile_once

    out = []
    for cycle in range(1, cycles + 1):
        before = emulator.stats()["calls"]
        start = time.perf_counter()
        moved = reconcile_once(ctx)
        seconds = time.perf_counter() - start
        after = emulator.stats()["calls"]
        routes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        routes = {k: v for k, v in routes.items() if v}
        row = {
            "mode": label,
            "cycle": cycle,
            "batches": ctx.stats["last_cycle_batches"],
            "ctx_calls": ctx.stats["last_cycle_calls"],
            "emulator_calls": sum(routes.values()),
            "routes": routes,
            "seconds": seconds,
            "moved": moved,
        }
        print(
            f"{label:<26} cycle {cycle}: {row['batches']:,} open, "
            f"{row['ctx_calls']:,} calls (emulator {row['emulator_calls']:,}: {routes}), "
            f"{seconds:.2f}s, moved {moved}"
        )
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=10_000)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from jobqueue.duties.context import DutyContext
    from jobqueue.emulator import EmulatorConfig
    from jobqueue.emulator.server import serve_in_thread
    from jobqueue.remote import make_provider
    from jobqueue.settings import load_settings
    from jobqueue.store import Store

    work = args.dir or Path(tempfile.mkdtemp(prefix="jobqueue-reconcile-"))
    work.mkdir(parents=True, exist_ok=True)
    config = EmulatorConfig(
        time_scale=1.0, seed=1, data_dir=work / "emulator", validating_seconds=1
    )
    try:
        with serve_in_thread(config) as em:
            start = time.perf_counter()
            remotes = make_open_batches(em.emulator, work, args.batches)
            em.emulator.settle()
            time.sleep(config.real(config.validating_seconds) + 0.5)
            print(
                f"created {len(remotes):,} remote batches in {time.perf_counter() - start:.1f}s: "
                f"{em.emulator.stats()['batch_statuses']}"
            )
            settings = load_settings(
                database_url=f"sqlite:///{work / 'jobqueue.db'}",
                data_dir=str(work / "data"),
                base_url=em.base_url,
                api_key="bench",
                log_level="warning",
            )
            store = Store(settings.effective_database_url)
            insert_local_rows(store, remotes)
            provider = make_provider(settings)
            results = []
            try:
                ctx = DutyContext(store=store, provider=provider, settings=settings)
                results += run_cycles(
                    ctx,
                    em.emulator,
                    args.cycles,
                    f"list pages (threshold {settings.list_threshold})",
                )
                high = settings.model_copy(update={"list_threshold": 10 * args.batches})
                ctx = DutyContext(store=store, provider=provider, settings=high)
                results += run_cycles(ctx, em.emulator, args.cycles, "one retrieve per batch")
            finally:
                provider.close()
                store.close()
        print(
            f"\n{'mode':<26} {'cycle':>5} {'open':>7} {'calls':>7} {'emulator':>9} {'seconds':>8}"
        )
        for r in results:
            print(
                f"{r['mode']:<26} {r['cycle']:>5} {r['batches']:>7,} {r['ctx_calls']:>7,} "
                f"{r['emulator_calls']:>9,} {r['seconds']:>8.2f}"
            )
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
