"""A local OpenAI-compatible Batch and Files server, for tests, demos and benchmarks.

`create_app` gives the ASGI app (in process with `httpx.ASGITransport`), `serve_in_thread`
runs it on a loopback port, `jobqueue emulator` serves it from the command line.
"""

from jobqueue.emulator.app import create_app
from jobqueue.emulator.config import EmulatorConfig
from jobqueue.emulator.engine import Emulator
from jobqueue.emulator.server import RunningEmulator, serve_in_thread

__all__ = ["Emulator", "EmulatorConfig", "RunningEmulator", "create_app", "serve_in_thread"]
