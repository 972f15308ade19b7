"""Every option of the emulator, in one dataclass shared by the engine, the app and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# Fault options that `set_faults` may change at run time.
FAULT_FIELDS = (
    "fault_500",
    "fault_429",
    "fault_drop",
    "fault_slow",
    "fault_cut_download",
    "retry_after_seconds",
    "slow_seconds",
    "request_failure_rate",
)


@dataclass
class EmulatorConfig:
    """Durations are simulated seconds; dividing by `time_scale` gives real seconds.

    `slow_seconds` and `retry_after_seconds` are HTTP timings and are never scaled.
    """

    time_scale: float = 1.0
    seed: int | None = None
    data_dir: Path | None = None
    api_key: str | None = None
    validating_seconds: float = 60.0
    requests_per_minute: float = 2000.0
    finalizing_seconds: float = 60.0
    cancelling_seconds: float = 60.0
    completion_window_seconds: float = 86400.0
    enqueued_token_limit: int | None = None
    request_failure_rate: float = 0.0
    fault_500: float = 0.0
    fault_429: float = 0.0
    retry_after_seconds: float = 1.0
    fault_drop: float = 0.0
    fault_slow: float = 0.0
    slow_seconds: float = 2.0
    fault_cut_download: float = 0.0
    webhook_url: str | None = None
    webhook_secret: str | None = None
    # Vector size for every embedding model; None: each model's own (1536 for
    # text-embedding-3-small and ada-002, 3072 for -3-large). A request's `dimensions` wins.
    embedding_dimensions: int | None = None
    # Output and error lines out of input order (deterministic by `seed`), as the remote may.
    shuffle_output: bool = False
    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    # Uploads of any purpose above this are refused at once (the remote's own upload limit).
    max_upload_bytes: int = 512 * 1024 * 1024
    webhook_attempts: int = 4

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if self.requests_per_minute <= 0:
            raise ValueError("requests_per_minute must be positive")
        if self.data_dir is not None:
            self.data_dir = Path(self.data_dir)
        if self.embedding_dimensions is not None and self.embedding_dimensions < 1:
            raise ValueError("embedding_dimensions must be at least 1")
        for name in FAULT_FIELDS:
            value = getattr(self, name)
            if value < 0 or (name.startswith(("fault_", "request_")) and value > 1):
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")

    def real(self, simulated_seconds: float) -> float:
        """Real seconds that `simulated_seconds` last at this time scale."""
        return simulated_seconds / self.time_scale

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["data_dir"] = str(self.data_dir) if self.data_dir else None
        out["api_key"] = "***" if self.api_key else None
        out["webhook_secret"] = "***" if self.webhook_secret else None
        return out
