# ruff: noqa: E402 - jobqueue is imported from TREE, after the import path is set
"""Recording and export alone, for comparing two source trees on the same machine state.

    TREE=/path/to/checkout python benchmarks/record_ab.py sqlite|pg N LABEL [tokens]

A job of N requests in batches of 50,000 (tests.store.helpers.add_job, all `completed`) in a
fresh SQLite file or PostgreSQL schema `ab_LABEL`; 1.1 KB embedding output lines with usage
(written once under /tmp/outcomes_bench/ab_files); then `record_outcomes` batch after batch,
each in its own write transaction, and `write_result_lines` of the whole job. TREE is the
checkout whose `jobqueue` is imported (the editable install's finder is set aside), so two
trees run alternately give a ratio under the same load. `tokens`: usage read (trees that have
it). Prints one line: seconds, MB/s (10^6 bytes) and µs a line for each.
"""

import os
import random
import shutil
import sys
import time
from pathlib import Path

import orjson

tree = os.environ["TREE"]
sys.meta_path[:] = [
    f
    for f in sys.meta_path
    if "editable" not in type(f).__module__.lower() and "editable" not in repr(f).lower()
]
sys.path.insert(0, tree)
which, n, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tokens = len(sys.argv) > 4 and sys.argv[4] == "tokens"
B = 50_000
work = Path(f"/tmp/outcomes_bench/ab_{label}_{which}")
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
files_dir = Path("/tmp/outcomes_bench/ab_files")
files_dir.mkdir(exist_ok=True)
rng = random.Random(1)


def out_file(b):
    p = files_dir / f"{b}.jsonl"
    if p.exists():
        return p
    with open(p, "wb") as f:
        for i in range(b * B, (b + 1) * B):
            emb = [round(rng.uniform(-0.1, 0.1), 17) for _ in range(40)]
            f.write(
                orjson.dumps(
                    {
                        "id": f"batch_req_{i:024x}",
                        "custom_id": f"request-{i:09d}",
                        "response": {
                            "status_code": 200,
                            "request_id": f"req_{i:024x}",
                            "body": {
                                "object": "list",
                                "data": [{"object": "embedding", "index": 0, "embedding": emb}],
                                "model": "text-embedding-3-small",
                                "usage": {"prompt_tokens": 8, "total_tokens": 8},
                            },
                        },
                        "error": None,
                    }
                )
                + b"\n"
            )
    return p


from jobqueue.store import Store
from jobqueue.store.results import record_outcomes, write_result_lines

if which == "pg":
    import psycopg

    schema = f"ab_{label}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        c.execute(f"CREATE SCHEMA {schema}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
else:
    url = f"sqlite:///{work / 'db.sqlite'}"
store = Store(url)
import jobqueue.store.outcomes as _o

assert _o.__file__.startswith(tree), _o.__file__
from tests.store.helpers import add_job

nb = n // B
job_id, batch_ids = add_job(store, *[{"status": "completed", "requests": B} for _ in range(nb)])
with store.read() as conn:
    number = store.get_job(conn, job_id).number
# custom ids in the files are request-%09d; add_job names them req-<p>: rename
with store.write() as conn:
    conn.exec_driver_sql(
        "UPDATE requests SET custom_id = 'request-' || substr('000000000' || position, -9, 9)"
        if which != "pg"
        else "UPDATE requests SET custom_id = 'request-' || lpad(position::text, 9, '0')"
    )
if which == "pg":  # the request rows as intake leaves them, and the planner told of them
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
        c.execute(f"VACUUM FULL ANALYZE {schema}.requests")
files = [out_file(b) for b in range(nb)]
size = sum(p.stat().st_size for p in files)
kw = {"tokens": tokens} if "tokens" in record_outcomes.__code__.co_varnames else {}
t0 = time.perf_counter()
for b, p in enumerate(files):
    with store.write() as conn:
        record_outcomes(
            store,
            conn,
            job_number=number,
            batch_number=b + 1,
            files=[("output", p)],
            can_retry=True,
            missing_code="missing_result",
            **kw,
            **({"replace": False} if kw else {}),
        )
rec = time.perf_counter() - t0
paths = {b + 1: {"output": str(p)} for b, p in enumerate(files)}
t0 = time.perf_counter()
with open(work / "export.jsonl", "wb") as out:
    lines = write_result_lines(store, number, paths, out)
exp = time.perf_counter() - t0
assert lines == n, lines
import resource

rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(
    f"{label:>10} {which:>6} tokens={tokens!s:5} n={n:,} record {rec:6.2f}s "
    f"{size / 1e6 / rec:6.0f} MB/s ({rec / n * 1e6:.2f} us/line)  export {exp:5.2f}s "
    f"{size / 1e6 / exp:6.0f} MB/s  maxrss {rss:.0f} MB",
    flush=True,
)
store.close()
shutil.rmtree(work, ignore_errors=True)
