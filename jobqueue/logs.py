"""structlog set up once at start-up: console on a terminal, JSON otherwise, always to stderr.

Secrets never reach a log: a processor masks any value whose key looks like a credential and
any `sk-…`/`whsec_…` token in a string, as a last line of defence behind code that never logs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(api[_-]?key|secret|authorization|password|token)$", re.I)
_SECRET_TEXT = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|whsec_[A-Za-z0-9+/=]{6,}|Bearer\s+\S+)")


class _StderrLogger:
    """Writes each line to the *current* `sys.stderr` (which tests and daemons may replace)."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _StderrHandler(logging.StreamHandler):
    """A stdlib handler bound to the current `sys.stderr`, not the one at start-up."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _stderr_logger_factory(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def redact_secrets(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event_dict.items()):
        if _SECRET_KEYS.search(key) and value is not None and key != "event":
            event_dict[key] = "***"
        elif isinstance(value, str) and _SECRET_TEXT.search(value):
            event_dict[key] = _SECRET_TEXT.sub("***", value)
    return event_dict


# Routine lines (debug, info) are dropped while these hold: `hushed()` (a progress bar owns the
# terminal) or, with `quiet_in_background`, while this process runs in the background of the
# terminal its logs go to (`jobqueue run &` beside a `jobqueue wait` and its bar).
_HUSH = {"count": 0, "background": False}
_ROUTINE = frozenset({"debug", "info"})


def _background_on_terminal() -> bool:
    try:
        fd = sys.stderr.fileno()
        return os.isatty(fd) and os.tcgetpgrp(fd) != os.getpgrp()
    except (AttributeError, OSError, ValueError):
        return False


def _hush_routine(_logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if method in _ROUTINE and (
        _HUSH["count"] or (_HUSH["background"] and _background_on_terminal())
    ):
        raise structlog.DropEvent
    return event_dict


@contextlib.contextmanager
def hushed() -> Any:
    """Drop routine log lines (debug, info) meanwhile; warnings and errors still go."""
    _HUSH["count"] += 1
    try:
        yield
    finally:
        _HUSH["count"] -= 1


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    stdlib: bool = True,
    quiet_in_background: bool = False,
) -> None:
    """Choose processors: `fmt` is `auto` (console on a TTY, else JSON), `json`, `console`.

    `quiet_in_background`: while the process runs in the background of the terminal it logs to
    (`jobqueue run &`), only warnings and errors are written, so that the terminal's foreground
    (a `jobqueue wait` progress bar) is not broken up by routine lines."""
    _HUSH["background"] = quiet_in_background
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors: list[Any] = [
        _hush_routine,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    if use_json:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=False,
    )
    if stdlib:
        # Libraries that use stdlib logging (uvicorn, apscheduler, alembic) go to stderr too.
        logging.basicConfig(
            level=max(numeric, logging.WARNING), handlers=[_StderrHandler()], force=True
        )


def get_logger(name: str = "jobqueue", **context: Any) -> Any:
    """A logger; when nobody configured structlog yet, jobqueue's defaults (stderr) apply, so an
    embedding program never sees jobqueue's logs on its stdout."""
    if not structlog.is_configured():
        # An embedding program's own stdlib logging set-up is left alone.
        configure_logging(stdlib=False)
    # A lazy proxy, not a logger bound now: modules take their logger at import time, before
    # the CLI has read `--log-level`; the proxy follows the configuration at each call.
    return structlog.get_logger(name, **context)


class FailureLog:
    """Logs a failure that keeps coming back once, then one line a minute while it lasts, and
    one line when it is over: not a traceback per duty per second while the database is down.

    `failed(what, exc)` the first time logs a warning (`outage(exc)` true: the database does not
    answer; one state shared by every `what`, since every duty fails alike) or the traceback at
    error (anything else, per `what` and exception type); again within `every` seconds, nothing
    but a count; after `every` seconds, one line with the count. `succeeded(what)` closes what
    was open for `what` (and the outage), with one line saying how long it lasted.
    """

    OUTAGE = "database"

    def __init__(
        self,
        logger: Any,
        *,
        every: float = 60.0,
        clock: Any = time.monotonic,
        outage: Any = None,
    ) -> None:
        self.log = logger
        self.every = every
        self.clock = clock
        self.outage = outage or (lambda _exc: False)
        self._lock = threading.Lock()
        self._open: dict[str, dict[str, Any]] = {}

    def failed(self, what: str, exc: BaseException, **fields: Any) -> None:
        outage = bool(self.outage(exc))
        key = self.OUTAGE if outage else f"{what}:{type(exc).__name__}"
        now = self.clock()
        error = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        with self._lock:
            state = self._open.get(key)
            if state is None:
                self._open[key] = {"since": now, "logged": now, "count": 1, "quiet": 0}
                first = True
            else:
                state["count"] += 1
                state["quiet"] += 1
                first = False
                due = now - state["logged"] >= self.every
                if due:
                    quiet, since = state["quiet"], state["since"]
                    state["logged"], state["quiet"] = now, 0
        if first:
            if outage:
                self.log.warning("database unavailable", error=error, during=what, **fields)
            else:
                self.log.error("duty failed", duty=what, exc_info=exc, **fields)
        elif due:
            message = "database still unavailable" if outage else "duty still failing"
            self.log.warning(
                message, failures=quiet, seconds=round(now - since), error=error, during=what,
                **fields,
            )  # fmt: skip

    def succeeded(self, what: str, *, outage_over: bool = True) -> None:
        """`what` worked: close what was open for it, and the outage unless `outage_over` is
        false (it worked without asking the database anything)."""
        if not self._open:  # the common case: nothing to close, no lock taken
            return
        now = self.clock()
        with self._lock:
            closed = [
                (key, self._open.pop(key))
                for key in list(self._open)
                if (key == self.OUTAGE and outage_over) or key.startswith(f"{what}:")
            ]
        for key, state in closed:
            message = "database available again" if key == self.OUTAGE else "duty works again"
            self.log.info(
                message, seconds=round(now - state["since"]), failures=state["count"], during=what
            )

    @property
    def failing(self) -> list[str]:
        """What is failing now: `database`, or `duty:ExceptionType` keys."""
        with self._lock:
            return list(self._open)
