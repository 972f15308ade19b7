"""Backoff: how long to wait before the next try, for every retry schedule in jobqueue.

Exponential from `base`, doubling per failed attempt, never past `cap`. With jitter (the default)
the delay is drawn uniformly from [0, that ceiling): "full jitter", which spreads the retries of
many things that failed together (a receiver outage, a refused burst) instead of having them come
back in lock-step. Without it the ceiling itself is the delay. `rng` is injectable for tests.
"""

from __future__ import annotations

import random
from typing import Protocol

# 2.0**60 times any base is past every cap; a bound on the exponent avoids float overflow.
_MAX_EXPONENT = 60


class Random(Protocol):
    def random(self) -> float: ...


def backoff(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 300.0,
    jitter: bool = True,
    rng: Random = random,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based) before the next one:
    `min(cap, base * 2**(attempt - 1))`, times a uniform draw from [0, 1) with `jitter`.

    An attempt below 1 counts as the first. Never negative.
    """
    exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
    ceiling = max(0.0, min(cap, base * 2.0**exponent))
    return ceiling * rng.random() if jitter else ceiling
