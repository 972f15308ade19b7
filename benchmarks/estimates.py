"""What a submit's token estimate costs beside the intake, and how far a sampled one strays.

    python benchmarks/estimates.py [--requests 100000] [--runs 2]

Writes a chat input file of `--requests` requests of 20 to 400 random dictionary words each
(with `max_tokens` from 50 to 500 set), then, `--runs` times in this process, `prepare_input`
(validation and sharding, not fsynced, shards of 50,000) three ways: without an estimate
(`estimate_every=0`), with a sample (`estimate_every=16`, what `JobQueue.submit` does for a job
without a budget or an enqueued-token limit) and with every request (`estimate_every=1`, under a
budget or a limit). Prints the seconds of each, what the estimate adds a request, and the
sampled estimate's error against every request's, per shard (input tokens and output bound).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import orjson

from jobqueue.api import SAMPLED_ESTIMATE_EVERY
from jobqueue.files import inputs

ENDPOINT = "/v1/chat/completions"
_WORDS = Path("/usr/share/dict/words")
_FALLBACK = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    words = _WORDS.read_text().split() if _WORDS.exists() else _FALLBACK
    rnd = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="estimates-") as tmp:
        src = Path(tmp) / "in.jsonl"
        with src.open("wb") as f:
            for i in range(args.requests):
                text = " ".join(rnd.choice(words) for _ in range(rnd.randint(20, 400)))
                body = {"model": "gpt-4o-mini", "max_tokens": rnd.randint(50, 500),
                        "messages": [{"role": "user", "content": text}]}  # fmt: skip
                line = {"custom_id": f"r{i}", "method": "POST", "url": ENDPOINT, "body": body}
                f.write(orjson.dumps(line) + b"\n")
        size = src.stat().st_size
        n = args.requests
        print(f"{n:,} requests, {size / 1e6:,.0f} MB ({size / n:,.0f} B each)")
        for run in range(1, args.runs + 1):
            seconds = {}
            shards = {}
            for every in (0, SAMPLED_ESTIMATE_EVERY, 1):
                start = time.perf_counter()
                prepared = inputs.prepare_input(
                    src, ENDPOINT, Path(tmp) / f"{run}-{every}", sync=False, estimate_every=every
                )
                seconds[every] = time.perf_counter() - start
                shards[every] = prepared.shards
            bare = seconds[0]
            parts = [f"run {run}: prepare_input {bare:.2f} s without an estimate"]
            for every, label in ((SAMPLED_ESTIMATE_EVERY, "sampled"), (1, "every request")):
                extra = seconds[every] - bare
                parts.append(
                    f"{label} {seconds[every]:.2f} s (+{extra / n * 1e6:.2f} µs a request, "
                    f"{extra / bare:+.0%})"
                )
            print("; ".join(parts))
            errors_in, errors_out = [], []
            for sampled, full in zip(shards[SAMPLED_ESTIMATE_EVERY], shards[1], strict=True):
                errors_in.append(sampled.estimated_tokens / full.estimated_tokens - 1)
                if sampled.max_output_tokens and full.max_output_tokens:
                    errors_out.append(sampled.max_output_tokens / full.max_output_tokens - 1)
            print(
                f"  sampled vs every request, per shard ({len(errors_in)} shards): input tokens "
                f"{min(errors_in):+.2%} to {max(errors_in):+.2%}, output bound "
                f"{min(errors_out):+.2%} to {max(errors_out):+.2%}"
            )


if __name__ == "__main__":
    main()
