"""Running the app under uvicorn: in a background thread for tests, or in the foreground."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from jobqueue.emulator.app import create_app
from jobqueue.emulator.config import EmulatorConfig
from jobqueue.emulator.engine import Emulator
from jobqueue.httpserver import BackgroundServer


@dataclass
class RunningEmulator:
    url: str  # root, e.g. "http://127.0.0.1:54321"
    base_url: str  # what an SDK client takes, e.g. "http://127.0.0.1:54321/v1"
    emulator: Emulator
    host: str
    port: int


@contextlib.contextmanager
def serve_in_thread(
    config_or_emulator: EmulatorConfig | Emulator | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    startup_timeout: float = 10.0,
) -> Iterator[RunningEmulator]:
    """Serve the emulator on a real socket (a free port by default) until the block ends."""
    owned = not isinstance(config_or_emulator, Emulator)
    emulator = (
        config_or_emulator
        if isinstance(config_or_emulator, Emulator)
        else Emulator(config_or_emulator or EmulatorConfig())
    )
    app = create_app(emulator)
    server = BackgroundServer(app, host, port).start(startup_timeout)
    try:
        yield RunningEmulator(
            url=server.url,
            base_url=f"{server.url}/v1",
            emulator=emulator,
            host=host,
            port=server.port,
        )
    finally:
        server.stop()
        if owned:
            emulator.close()
