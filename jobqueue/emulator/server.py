"""Running the app under uvicorn: in a background thread for tests, or in the foreground."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from jobqueue.emulator.app import create_app
from jobqueue.emulator.config import EmulatorConfig
from jobqueue.emulator.engine import Emulator


@dataclass
class RunningEmulator:
    url: str  # root, e.g. "http://127.0.0.1:54321"
    base_url: str  # what an SDK client takes, e.g. "http://127.0.0.1:54321/v1"
    emulator: Emulator
    host: str
    port: int


def uvicorn_config(app: object, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        # The emulator is never behind a proxy; skip the header rewriting.
        proxy_headers=False,
        timeout_keep_alive=30,
    )


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
    server = uvicorn.Server(uvicorn_config(app, host, port))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name="emulator-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the emulator did not start")
            time.sleep(0.005)
        bound = server.servers[0].sockets[0].getsockname()
        url = f"http://{host}:{bound[1]}"
        yield RunningEmulator(
            url=url, base_url=f"{url}/v1", emulator=emulator, host=host, port=bound[1]
        )
    finally:
        server.should_exit = True
        thread.join(10)
        if owned:
            emulator.close()
