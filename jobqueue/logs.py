"""structlog set up once at start-up: console on a terminal, JSON otherwise, always to stderr.

Secrets never reach a log: a processor masks any value whose key looks like a credential and
any `sk-…`/`whsec_…` token in a string, as a last line of defence behind code that never logs them.
"""

from __future__ import annotations

import logging
import re
import sys
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


def configure_logging(level: str = "info", fmt: str = "auto", *, stdlib: bool = True) -> None:
    """Choose processors: `fmt` is `auto` (console on a TTY, else JSON), `json`, `console`."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors: list[Any] = [
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
    return structlog.get_logger(name).bind(**context)
