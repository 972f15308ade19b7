"""`jobqueue emulator`: serve the emulator in the foreground."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from jobqueue.emulator.app import create_app
from jobqueue.emulator.config import EmulatorConfig
from jobqueue.emulator.engine import Emulator
from jobqueue.httpserver import uvicorn_config

_SIM = "simulated seconds, divided by --time-scale"


def emulator_command(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8080,
    time_scale: Annotated[
        float, typer.Option(help="Speed-up of every duration: 3600 makes 24 h last 24 s.")
    ] = 1.0,
    seed: Annotated[
        int | None, typer.Option(help="Seed for faults, failures and --shuffle-output.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where files live (default: a temporary dir).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Accept only this key (default: any key).")
    ] = None,
    validating_seconds: Annotated[float, typer.Option(help=f"Validation, {_SIM}.")] = 60.0,
    requests_per_minute: Annotated[
        float, typer.Option(help="Requests finished per simulated minute.")
    ] = 2000.0,
    finalizing_seconds: Annotated[float, typer.Option(help=f"Finalizing, {_SIM}.")] = 60.0,
    cancelling_seconds: Annotated[float, typer.Option(help=f"Cancelling, {_SIM}.")] = 60.0,
    completion_window_seconds: Annotated[
        float, typer.Option(help=f"The 24h completion window, {_SIM}.")
    ] = 86400.0,
    enqueued_token_limit: Annotated[
        int | None, typer.Option(help="Enqueued tokens per model over open batches.")
    ] = None,
    request_failure_rate: Annotated[
        float, typer.Option(help="Share of requests answered 500 in the error file.")
    ] = 0.0,
    fault_500: Annotated[float, typer.Option(help="Probability of an HTTP 500.")] = 0.0,
    fault_429: Annotated[float, typer.Option(help="Probability of an HTTP 429.")] = 0.0,
    retry_after_seconds: Annotated[
        float, typer.Option(help="Retry-After of injected 429s (real seconds).")
    ] = 1.0,
    fault_drop: Annotated[
        float, typer.Option(help="Probability of closing the connection without an answer.")
    ] = 0.0,
    fault_slow: Annotated[float, typer.Option(help="Probability of a slow answer.")] = 0.0,
    slow_seconds: Annotated[
        float, typer.Option(help="Delay of a slow answer (real seconds).")
    ] = 2.0,
    fault_cut_download: Annotated[
        float, typer.Option(help="Probability of a file download cut short.")
    ] = 0.0,
    webhook_url: Annotated[
        str | None, typer.Option(help="POST batch.* events here (needs --webhook-secret).")
    ] = None,
    webhook_secret: Annotated[
        str | None, typer.Option(help="Standard Webhooks secret, e.g. whsec_<base64>.")
    ] = None,
    embedding_dimensions: Annotated[
        int | None,
        typer.Option(
            help="Embedding size when a request gives no `dimensions` (default: the model's "
            "own, e.g. 1536 for text-embedding-3-small, 3072 for -3-large)."
        ),
    ] = None,
    shuffle_output: Annotated[
        bool,
        typer.Option(
            "--shuffle-output/--ordered-output",
            help="Write output lines out of input order (deterministic by --seed), as the "
            "remote may.",
        ),
    ] = False,
    max_requests: Annotated[int, typer.Option(help="Requests per batch input file.")] = 50_000,
    max_bytes: Annotated[int, typer.Option(help="Bytes per batch input file.")] = 200 * 1024 * 1024,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve a local OpenAI-compatible Batch and Files API (the emulator)."""
    if bool(webhook_url) != bool(webhook_secret):
        raise typer.BadParameter("--webhook-url and --webhook-secret go together")
    try:
        config = EmulatorConfig(
            time_scale=time_scale,
            seed=seed,
            data_dir=data_dir,
            api_key=api_key,
            validating_seconds=validating_seconds,
            requests_per_minute=requests_per_minute,
            finalizing_seconds=finalizing_seconds,
            cancelling_seconds=cancelling_seconds,
            completion_window_seconds=completion_window_seconds,
            enqueued_token_limit=enqueued_token_limit,
            request_failure_rate=request_failure_rate,
            fault_500=fault_500,
            fault_429=fault_429,
            retry_after_seconds=retry_after_seconds,
            fault_drop=fault_drop,
            fault_slow=fault_slow,
            slow_seconds=slow_seconds,
            fault_cut_download=fault_cut_download,
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
            embedding_dimensions=embedding_dimensions,
            shuffle_output=shuffle_output,
            max_requests=max_requests,
            max_bytes=max_bytes,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    emulator = Emulator(config)
    app = create_app(emulator)
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level))
    shown_host = f"[{host}]" if ":" in host else host
    typer.echo(
        f"jobqueue emulator: http://{shown_host}:{port}/v1 (time scale {time_scale:g}, "
        f"files in {emulator.data_dir}, control API at /_emulator/)",
        err=True,
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler
    # it found: make that one a no-op so that the engine is closed and the exit is clean.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        emulator.close()
    typer.echo("jobqueue emulator: stopped", err=True)
