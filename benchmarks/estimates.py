"""The estimate pass of a submit beside the intake.

    python benchmarks/estimates.py [--requests 100000] [--words 180] [--runs 2]

Writes a chat input file of `--requests` requests of `--words` random dictionary words each
(~1.3 KB a line at 180 words, with `max_tokens` set), then, `--runs` times in this process:
`prepare_input` (validation and sharding, not fsynced) and the pass that estimates each shard's
input tokens and output bound (`jobqueue.api._shard_plan`, what `JobQueue.submit` does for
every job). Prints the seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import orjson

from jobqueue.api import _shard_plan
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
        for run in range(1, args.runs + 1):
            start = time.perf_counter()
            prepared = inputs.prepare_input(src, ENDPOINT, Path(tmp) / f"s{run}", sync=False)
            middle = time.perf_counter()
            for shard in prepared.shards:
                _shard_plan(ENDPOINT, shard)
            end = time.perf_counter()
            intake, estimate = middle - start, end - middle
            print(
                f"run {run}: prepare_input {intake:.2f} s, estimate pass {estimate:.2f} s "
                f"({estimate / intake:.0%} of it; "
                f"{estimate / args.requests * 1e6:.1f} µs a request)"
            )


if __name__ == "__main__":
    main()
