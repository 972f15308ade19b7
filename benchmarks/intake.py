"""Intake benchmark: how fast and in how much memory an input file is validated and sharded.

    python benchmarks/intake.py [--requests N] [--keep] [--dir D]

Generates a JSONL of N chat-completion requests (~1 KB bodies, unique custom ids), then measures
`jobqueue.files.inputs.prepare_input` on it and `split -l 50000` as a baseline. Each measured
run is a fresh subprocess, so the generator's memory is not counted; its peak RSS comes from
`wait4`.

Seam for more measurements (e.g. a `--full` run of `jobqueue submit`): write a module-level
function taking keyword arguments and returning a dict (or None), then call
`measure_callable("module:function", {...})`; for an external command, `measure_command(argv)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

MB = 1_000_000
_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "batch"]
_WORDS += ["queues", "hum", "along", "with", "durable", "requests", "sharded", "carefully"]


@dataclass
class Measurement:
    seconds: float  # wall time of the measured part
    peak_rss: int  # bytes, of the measuring subprocess alone
    result: dict[str, Any] = field(default_factory=dict)  # what the measured callable returned


def generate(path: Path, requests: int, seed: int = 1) -> int:
    """Write `requests` chat-completion lines (~1 KB bodies) to `path`; return its size."""
    import random

    rng = random.Random(seed)
    words = _WORDS
    with open(path, "wb", buffering=1 << 20) as f:
        for i in range(requests):
            text = " ".join(rng.choices(words, k=150))
            line = {
                "custom_id": f"request-{i:09d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [
                        {"role": "system", "content": "You are a careful assistant."},
                        {"role": "user", "content": text},
                    ],
                    "max_tokens": 256,
                },
            }
            f.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
    return path.stat().st_size


def measure_command(argv: list[str], stdout_path: Path | None = None) -> Measurement:
    """Run `argv` as a fresh process; its wall time and its own peak RSS (via wait4)."""
    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    finally:
        if stdout_path:
            out.close()  # type: ignore[union-attr]
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return Measurement(seconds, peak)


def measure_callable(target: str, kwargs: dict[str, Any]) -> Measurement:
    """Run `module:function(**kwargs)` in a fresh interpreter; time the call alone.

    Peak RSS is the whole child's (interpreter and imports included): its own `VmHWM` where
    /proc has it. wait4's ru_maxrss is not the child's alone on Linux: exec records the
    high-water RSS of the image it replaces, i.e. the forking parent's (the benchmark with its
    emulator), so it grows with whatever the parent holds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, __file__, "--child", target, orjson.dumps(kwargs).decode()]
        m = measure_command(argv, stdout_path=out)
        report = orjson.loads(out.read_bytes())
    peak = report.get("peak_rss") or m.peak_rss
    return Measurement(report["seconds"], peak, report.get("result") or {})


def _own_peak_rss() -> int | None:
    """This process's peak RSS in bytes since its exec (Linux `VmHWM`), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _child(target: str, kwargs_json: str) -> None:
    module, name = target.split(":")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    fn = getattr(importlib.import_module(module), name)
    kwargs = orjson.loads(kwargs_json)
    start = time.perf_counter()
    result = fn(**kwargs)
    seconds = time.perf_counter() - start
    report = {"seconds": seconds, "result": result, "peak_rss": _own_peak_rss()}
    sys.stdout.buffer.write(orjson.dumps(report))


def run_prepare(source: str, staging: str, sync: bool = True) -> dict[str, Any]:
    """Measured callable: prepare_input on `source` into `staging`."""
    from jobqueue.files.inputs import prepare_input

    prepared = prepare_input(Path(source), "/v1/chat/completions", Path(staging), sync=sync)
    return {"shards": len(prepared.shards), "requests": prepared.requests}


def run_submit(source: str, database_url: str, data_dir: str) -> dict[str, Any]:
    """Measured callable: the whole `jobqueue submit`, request index rows included."""
    from jobqueue.api import JobQueue

    with JobQueue(database_url=database_url, data_dir=data_dir) as jq:
        job = jq.submit(source, "/v1/chat/completions")
        return {"batches": len(job.batches), "requests": job.request_counts.total}


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--keep", action="store_true", help="keep the generated file and shards")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument(
        "--postgres-url",
        help="also measure the whole submit against this PostgreSQL database (it gets a job)",
    )
    args = ap.parse_args(argv)

    work = args.dir or Path(tempfile.mkdtemp(prefix="jobqueue-intake-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "input.jsonl"
    try:
        start = time.perf_counter()
        size = generate(source, args.requests)
        print(
            f"generated {args.requests:,} requests, {size / MB:,.0f} MB "
            f"in {time.perf_counter() - start:.1f}s ({source})"
        )
        rows: list[tuple[str, Measurement]] = []

        staging = work / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        m = measure_callable(
            "benchmarks.intake:run_prepare", {"source": str(source), "staging": str(staging)}
        )
        rows.append((f"prepare_input ({m.result.get('shards')} shards, fsync)", m))
        shutil.rmtree(staging, ignore_errors=True)
        m = measure_callable(
            "benchmarks.intake:run_prepare",
            {"source": str(source), "staging": str(staging), "sync": False},
        )
        rows.append(("prepare_input (no fsync)", m))

        # The whole submit: validation, shards, and the job, batches and a million request
        # index rows in the database (one transaction).
        for label, url in [
            ("sqlite", f"sqlite:///{work / 'bench.db'}"),
            ("postgres", args.postgres_url),
        ]:
            if url is None:
                continue
            data_dir = work / f"data-{label}"
            shutil.rmtree(data_dir, ignore_errors=True)
            (work / "bench.db").unlink(missing_ok=True)
            # The database exists beforehand, as it does for any submit but the very first
            # (creating it runs the migrations: about a second, once).
            from jobqueue.store import Store

            Store(url).close()
            m = measure_callable(
                "benchmarks.intake:run_submit",
                {"source": str(source), "database_url": url, "data_dir": str(data_dir)},
            )
            rows.append((f"jobqueue submit ({label})", m))
            shutil.rmtree(data_dir, ignore_errors=True)

        split_dir = work / "split"
        shutil.rmtree(split_dir, ignore_errors=True)
        split_dir.mkdir()
        m = measure_command(["split", "-l", "50000", str(source), str(split_dir / "part-")])
        rows.append(("split -l 50000 (baseline)", m))

        print(f"\n{'what':<40} {'seconds':>8} {'MB/s':>8} {'peak RSS MB':>12}")
        for name, m in rows:
            print(
                f"{name:<40} {m.seconds:>8.2f} {size / MB / m.seconds:>8.0f} "
                f"{m.peak_rss / MB:>12.0f}"
            )
        if not args.keep:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(split_dir, ignore_errors=True)
    finally:
        if not args.keep:
            source.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
