"""What a submit's token estimate costs beside the intake.

    python benchmarks/estimates.py [--requests 100000] [--words 180] [--runs 2]

Writes a chat input file of `--requests` requests of `--words` random dictionary words each
(~1.3 KB a line at 180 words, with `max_tokens` set), then, `--runs` times in this process:
`prepare_input` (validation and sharding, not fsynced) without the estimate, the same with it
(`estimate=True`, what `JobQueue.submit` does for every job: each body estimated as its line is
validated), and the separate pass over the shards that submit ran before (every line read and
parsed again, `jobqueue.api._estimate_file`; `set_budget` still does it). Prints the seconds of
each and what the estimate adds a request.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import orjson

from jobqueue.api import _estimate_file
from jobqueue.files import inputs

ENDPOINT = "/v1/chat/completions"
_WORDS = Path("/usr/share/dict/words")
_FALLBACK = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--words", type=int, default=180)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    words = _WORDS.read_text().split() if _WORDS.exists() else _FALLBACK
    rnd = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="estimates-") as tmp:
        src = Path(tmp) / "in.jsonl"
        with src.open("wb") as f:
            for i in range(args.requests):
                text = " ".join(rnd.choice(words) for _ in range(args.words))
                body = {"model": "gpt-4o-mini", "max_tokens": 200,
                        "messages": [{"role": "user", "content": text}]}  # fmt: skip
                line = {"custom_id": f"r{i}", "method": "POST", "url": ENDPOINT, "body": body}
                f.write(orjson.dumps(line) + b"\n")
        size = src.stat().st_size
        print(
            f"{args.requests:,} requests, {size / 1e6:,.0f} MB ({size / args.requests:,.0f} B each)"
        )
        n = args.requests
        for run in range(1, args.runs + 1):
            start = time.perf_counter()
            inputs.prepare_input(src, ENDPOINT, Path(tmp) / f"a{run}", sync=False, estimate=False)
            bare = time.perf_counter() - start
            start = time.perf_counter()
            prepared = inputs.prepare_input(src, ENDPOINT, Path(tmp) / f"b{run}", sync=False)
            inline = time.perf_counter() - start
            start = time.perf_counter()
            for shard in prepared.shards:
                _estimate_file(ENDPOINT, shard.path)
            separate = time.perf_counter() - start
            print(
                f"run {run}: prepare_input {bare:.2f} s without the estimate, {inline:.2f} s "
                f"with it (+{(inline - bare) / n * 1e6:.1f} µs a request, "
                f"{(inline - bare) / bare:+.0%}); the separate pass {separate:.2f} s "
                f"({separate / n * 1e6:.1f} µs a request, {separate / bare:+.0%})"
            )


if __name__ == "__main__":
    main()
