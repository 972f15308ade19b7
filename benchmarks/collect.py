"""Collect benchmark: how fast and in how much memory a job's results are collected and exported.

    python benchmarks/collect.py [--requests N] [--dimensions D] [--dir DIR] [--keep]
                                  [--database-url URL] [--repeat R]

For N/4 and then N embedding requests (one input each, the emulator answering with D-dimensional
vectors: ~1.1 KB output lines at D=40, so 1,000,000 requests give over 1 GB of output):

1. setup (this process, not measured): the emulator serves on a loopback port (time scale 1000,
   no faults, an endless completion window, a huge requests-per-minute rate); the job is
   submitted with `JobQueue.submit` and only the submit and reconcile duties run until every
   batch has ended;
2. collection: a fresh process runs only the collect duty (`collect_once` until it moves
   nothing): downloads every output file and records every request's outcome. Twice: first
   with usage not read (the scan skips every response body), then, the collection undone, with
   usage recorded (the default: tokens per request and per batch);
3. export: a fresh process runs `JobQueue.export_results` (what `jobqueue results JOB --output
   FILE` does) into a file;
4. baseline: a fresh process reads every output file the way the SDK docs show,
   `client.files.content(file_id).text.split("\\n")` with the `openai` SDK.

Export and baseline each run `--repeat` times (3), after a sync each; the best time is shown
(the writes of a new 1 GB file vary by twice from one run to the next), all of them printed.

Each measured part runs in its own subprocess (`benchmarks.intake.measure_callable`), so its
peak RSS is its own (from `wait4`); MB/s is output bytes over the measured call's seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.intake import MB, Measurement, measure_callable

_WORDS = ["durable", "queues", "embed", "every", "line", "of", "a", "large", "batch", "quickly"]
TIME_SCALE = 1000.0
MODEL = "text-embedding-3-small"


def generate_embeddings(path: Path, requests: int, seed: int = 1) -> int:
    """Write `requests` embedding requests (one short input each) to `path`; return its size."""
    rng = random.Random(seed)
    with open(path, "wb", buffering=1 << 20) as f:
        for i in range(requests):
            line = {
                "custom_id": f"request-{i:09d}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": MODEL, "input": " ".join(rng.choices(_WORDS, k=8))},
            }
            f.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
    return path.stat().st_size


def queue_options(work: Path, base_url: str, database_url: str | None = None) -> dict[str, Any]:
    """JobQueue keyword arguments shared by the setup and every measured child."""
    return {
        "database_url": database_url or f"sqlite:///{work / 'jobqueue.db'}",
        "data_dir": str(work / "data"),
        "base_url": base_url,
        "api_key": "bench",
        # Simulated seconds: at the emulator's time scale 7 days would pass in 10 minutes.
        "output_expires_after": 2_592_000,
        "log_level": "warning",
    }


def setup_job(source: Path, options: dict[str, Any], timeout: float = 1200.0) -> str:
    """Submit the job and run the submit and reconcile duties until every batch has ended."""
    from sqlalchemy import select

    from jobqueue.api import JobQueue
    from jobqueue.core.states import BATCH_TERMINAL
    from jobqueue.duties.reconcile import reconcile_once
    from jobqueue.duties.submit import submit_once
    from jobqueue.service.daemon import Daemon
    from jobqueue.store.tables import batches_table

    terminal = {s.value for s in BATCH_TERMINAL}
    with JobQueue(**options) as jq:
        job = jq.submit(source, "/v1/embeddings")
        daemon = Daemon(jq.settings, jq.store)
        try:
            ctx = daemon.ctx
            deadline = time.monotonic() + timeout
            while True:
                while submit_once(ctx):
                    pass
                reconcile_once(ctx)
                with jq.store.read() as conn:
                    statuses = [
                        s
                        for (s,) in conn.execute(
                            select(batches_table.c.status).where(batches_table.c.job_id == job.id)
                        )
                    ]
                if all(s in terminal for s in statuses):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"batches not terminal after {timeout}s: {statuses}")
                time.sleep(0.5)
        finally:
            daemon.stop()
        bad = [s for s in statuses if s != "completed"]
        if bad:
            raise RuntimeError(f"batches ended {bad}")
    return job.id


def output_files(options: dict[str, Any], job_id: str) -> list[tuple[str, int]]:
    """(remote output file id, bytes) of every batch of the job."""
    from sqlalchemy import select

    from jobqueue.api import JobQueue
    from jobqueue.remote import make_provider
    from jobqueue.store.tables import batches_table

    with JobQueue(**options) as jq:
        with jq.store.read() as conn:
            ids = [
                fid
                for (fid,) in conn.execute(
                    select(batches_table.c.output_file_id)
                    .where(batches_table.c.job_id == job_id)
                    .order_by(batches_table.c.shard_index)
                )
            ]
        provider = make_provider(jq.settings)
        try:
            return [(fid, provider.retrieve_file(fid).bytes) for fid in ids]
        finally:
            provider.close()


# -- measured callables (each runs in a fresh interpreter) ------------------------------------


def reset_collection(options: dict[str, Any], job_id: str) -> None:
    """Undo a collection (not measured): the job's outcome rows, its batches' collected state
    and token sums, its counts and status, and the downloaded files, so it is collected again
    from the start."""
    from sqlalchemy import delete, select, update

    from jobqueue.api import JobQueue
    from jobqueue.store.tables import batches_table, jobs_table, outcomes_table

    b, j, o = batches_table, jobs_table, outcomes_table
    with JobQueue(**options) as jq, jq.store.write() as conn:
        number = conn.execute(select(j.c.number).where(j.c.id == job_id)).scalar_one()
        paths = conn.execute(
            select(b.c.output_path, b.c.error_path).where(b.c.job_id == job_id)
        ).all()
        conn.execute(delete(o).where(o.c.job_number == number))
        conn.execute(
            update(b)
            .where(b.c.job_id == job_id)
            .values(
                collected_at=None, output_path=None, error_path=None, lease_owner=None,
                lease_until=None, lease_token=None, input_tokens=None,
                cached_input_tokens=None, output_tokens=None, reasoning_tokens=None,
            )
        )  # fmt: skip
        conn.execute(
            update(j)
            .where(j.c.id == job_id)
            .values(status="running", requests_succeeded=0, requests_failed=0, finished_at=None)
        )
    for row in paths:
        for path in row:
            if path:
                Path(path).unlink(missing_ok=True)


def run_collect(options: dict[str, Any], tokens: bool = True) -> dict[str, Any]:
    """Only the collect duty, until it moves nothing; download seconds measured apart.
    `tokens`: usage read and recorded (the default), or not (the scan skips every body)."""
    from jobqueue.api import JobQueue
    from jobqueue.duties.collect import collect_once
    from jobqueue.service.daemon import Daemon

    with JobQueue(**options) as jq:
        daemon = Daemon(jq.settings, jq.store)
        ctx = daemon.ctx
        provider = ctx.provider
        download = provider.download_file
        spent = {"download": 0.0}

        def timed_download(*args: Any, **kwargs: Any) -> int:
            start = time.perf_counter()
            try:
                return download(*args, **kwargs)
            finally:
                spent["download"] += time.perf_counter() - start

        provider.download_file = timed_download  # type: ignore[method-assign]
        import jobqueue.duties.collect as collect_module

        record = collect_module.record_outcomes
        spent["record"] = 0.0

        def timed_record(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return record(*args, **kwargs, tokens=tokens)
            finally:
                spent["record"] += time.perf_counter() - start

        collect_module.record_outcomes = timed_record  # type: ignore[assignment]
        batches = 0
        try:
            while moved := collect_once(ctx):
                batches += moved
        finally:
            daemon.stop()
        return {
            "batches": batches,
            "bytes": ctx.stats.get("collected_bytes", 0),
            "download_seconds": spent["download"],
            "record_seconds": spent["record"],
        }


def run_export(options: dict[str, Any], job_id: str, output: str) -> dict[str, Any]:
    from jobqueue.api import JobQueue

    with JobQueue(**options) as jq, open(output, "wb") as out:
        lines = jq.export_results(job_id, out)
    return {"lines": lines, "bytes": Path(output).stat().st_size}


def run_sdk_baseline(base_url: str, file_ids: list[str]) -> dict[str, Any]:
    """What the SDK docs show: the whole file as text, split into lines."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    lines = 0
    for file_id in file_ids:
        text = client.files.content(file_id).text
        lines += sum(1 for line in text.split("\n") if line)
        del text
    client.close()
    return {"lines": lines}


# -- the run ----------------------------------------------------------------------------------


def best_of(
    repeat: int, label: str, target: str, kwargs: dict[str, Any], output: Path | None = None
) -> Measurement:
    """The fastest of `repeat` measurements (each in a fresh process, after a sync), with the
    highest peak RSS of them; all the times printed. With `output`, each run writes a new file
    there (the one before removed first): rewriting a file is faster than writing a new one."""
    runs = []
    previous: Path | None = None
    for i in range(repeat):
        if output is not None:
            if previous is not None:
                previous.unlink(missing_ok=True)
            previous = output.with_name(f"{output.stem}-{i}{output.suffix}")
            kwargs = {**kwargs, "output": str(previous)}
        os.sync()
        runs.append(measure_callable(target, kwargs))
    if repeat > 1:
        print(f"  {label}: " + ", ".join(f"{m.seconds:.2f}s" for m in runs))
    best = min(runs, key=lambda m: m.seconds)
    return Measurement(best.seconds, max(m.peak_rss for m in runs), best.result)


def bench_size(
    requests: int, dimensions: int, work: Path, database_url: str | None = None, repeat: int = 3
) -> dict[str, Any]:
    from jobqueue.emulator import EmulatorConfig
    from jobqueue.emulator.server import serve_in_thread

    work.mkdir(parents=True, exist_ok=True)
    source = work / "input.jsonl"
    start = time.perf_counter()
    size = generate_embeddings(source, requests)
    print(f"[{requests:,}] input {size / MB:,.0f} MB in {time.perf_counter() - start:.1f}s")
    config = EmulatorConfig(
        time_scale=TIME_SCALE,
        seed=1,
        data_dir=work / "emulator",
        requests_per_minute=1e12,
        completion_window_seconds=1e12,
        embedding_dimensions=dimensions,
    )
    rows: dict[str, Measurement] = {}
    with serve_in_thread(config) as em:
        options = queue_options(work, em.base_url, database_url)
        start = time.perf_counter()
        job_id = setup_job(source, options)
        files = output_files(options, job_id)
        output_bytes = sum(n for _, n in files)
        print(
            f"[{requests:,}] setup (submit, emulator run, reconcile) "
            f"{time.perf_counter() - start:.1f}s: {len(files)} output files, "
            f"{output_bytes / MB:,.0f} MB"
        )
        # Collected twice: without usage (the scan skips every body), then with it (the
        # default), the collection undone in between.
        rows["collect_bare"] = measure_callable(
            "benchmarks.collect:run_collect", {"options": options, "tokens": False}
        )
        reset_collection(options, job_id)
        rows["collect"] = measure_callable(
            "benchmarks.collect:run_collect", {"options": options, "tokens": True}
        )
        # Each after a sync (the export writes 1 GB too, and would otherwise wait out the
        # writeback of what was written just before it), the best of `repeat` each.
        rows["export"] = best_of(
            repeat, f"[{requests:,}] export", "benchmarks.collect:run_export",
            {"options": options, "job_id": job_id}, output=work / "results.jsonl",
        )  # fmt: skip
        rows["sdk"] = best_of(
            repeat, f"[{requests:,}] SDK baseline", "benchmarks.collect:run_sdk_baseline",
            {"base_url": em.base_url, "file_ids": [f for f, _ in files]},
        )  # fmt: skip
    return {"requests": requests, "bytes": output_bytes, "rows": rows}


def print_table(results: list[dict[str, Any]]) -> None:
    names = {
        "collect_bare": "collect, usage not read",
        "collect": "collect (download + record)",
        "export": "export_results (ordered)",
        "sdk": "SDK .text.split (baseline)",
    }
    print(
        f"\n{'what':<30} {'requests':>10} {'MB':>7} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12}"
    )
    for r in results:
        for key, label in names.items():
            m = r["rows"][key]
            mb = r["bytes"] / MB
            print(
                f"{label:<30} {r['requests']:>10,} {mb:>7,.0f} {m.seconds:>8.2f} "
                f"{mb / m.seconds:>7.0f} {m.peak_rss / MB:>12.0f}"
            )
    for r in results:
        for key in ("collect_bare", "collect"):
            c = r["rows"][key]
            dl = c.result.get("download_seconds", 0.0)
            print(
                f"[{r['requests']:,}] {names[key]}: download {dl:.2f}s (overlapped), recording "
                f"{c.result.get('record_seconds', 0):.2f}s, in all {c.seconds:.2f}s"
            )
        bare, full = r["rows"]["collect_bare"], r["rows"]["collect"]
        recording = full.result.get("record_seconds", 0) / max(
            bare.result.get("record_seconds", 0), 1e-9
        )
        print(
            f"[{r['requests']:,}] usage recording: collect {full.seconds / bare.seconds:.2f}x "
            f"the time without it, recording {recording:.2f}x; "
            f"export wrote {r['rows']['export'].result.get('lines', 0):,} lines"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--dimensions", type=int, default=40, help="embedding dimensions (default 40)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument(
        "--database-url",
        help="run on this database instead of a new SQLite file (e.g. a PostgreSQL schema of "
        "its own: it gets two jobs)",
    )
    ap.add_argument(
        "--repeat", type=int, default=3,
        help="export and SDK baseline: the best of this many runs (default 3)",
    )  # fmt: skip
    args = ap.parse_args(argv)

    work = args.dir or Path(tempfile.mkdtemp(prefix="jobqueue-collect-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for requests in (args.requests // 4, args.requests):
            sub = work / f"n{requests}"
            shutil.rmtree(sub, ignore_errors=True)
            results.append(
                bench_size(requests, args.dimensions, sub, args.database_url, args.repeat)
            )
            if not args.keep:
                shutil.rmtree(sub, ignore_errors=True)
        print_table(results)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
