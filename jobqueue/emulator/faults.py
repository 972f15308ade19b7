"""Injected faults: which call gets which, reproducibly, and how a connection is dropped."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import httpx

from jobqueue.emulator.config import FAULT_FIELDS, EmulatorConfig

# Short names accepted by `set_faults` and the control API besides the config field names.
ALIASES = {
    "500": "fault_500",
    "429": "fault_429",
    "drop": "fault_drop",
    "slow": "fault_slow",
    "cut_download": "fault_cut_download",
}


class DroppedConnection(httpx.RemoteProtocolError):
    """Raised in process (no socket to close) where a real server would drop the connection.

    A subclass of httpx's own error so that clients on `httpx.ASGITransport`, and the SDK on
    top of them, see the same class of failure as over a real socket.
    """


class Faults:
    """Fault probabilities and one seeded random stream for all decisions."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self.settings: dict[str, float] = {
            name: float(getattr(config, name)) for name in FAULT_FIELDS
        }
        self.counts: dict[str, int] = {"500": 0, "429": 0, "drop": 0, "slow": 0, "cut_download": 0}

    def update(self, **values: Any) -> dict[str, float]:
        resolved: dict[str, float] = {}
        for key, value in values.items():
            name = ALIASES.get(key, key)
            if name not in self.settings:
                raise ValueError(f"unknown fault setting {key!r}; known: {sorted(self.settings)}")
            number = float(value)
            is_probability = name.startswith(("fault_", "request_"))
            if number < 0 or (is_probability and number > 1):
                raise ValueError(f"{key} must be in [0, 1]" if is_probability else f"{key} < 0")
            resolved[name] = number
        with self._lock:
            self.settings.update(resolved)
            return dict(self.settings)

    def draw(self, *, download: bool) -> tuple[str | None, bool]:
        """(the call's fault: "500", "429", "drop", "slow" or None; whether to cut the body)."""
        with self._lock:
            s = self.settings
            u = self._rng.random()
            fault: str | None = None
            edge = 0.0
            for name in ("500", "429", "drop", "slow"):
                edge += s[ALIASES[name]]
                if u < edge:
                    fault = name
                    break
            cut = download and self._rng.random() < s["fault_cut_download"]
            if fault:
                self.counts[fault] += 1
            if cut and fault in (None, "slow"):
                self.counts["cut_download"] += 1
            return fault, cut

    def count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"settings": dict(self.settings), "injected": dict(self.counts)}


async def drop_connection(send: Any) -> None:
    """Close the client's connection without an answer.

    Under uvicorn the raw `send` is a bound method of its request cycle, which holds the
    socket's transport; aborting it closes the socket at once, and the cycle sees the
    disconnect before it could write its own 500. Without a transport (in process), raise
    an httpx transport error instead.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        raise DroppedConnection("Server disconnected without sending a response (emulated).")
    transport.abort()
    # Let connection_lost run so that uvicorn marks the cycle disconnected.
    for _ in range(3):
        await asyncio.sleep(0)
