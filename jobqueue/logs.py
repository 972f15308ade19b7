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
_configured = False


def redact_secrets(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event_dict.items()):
        if _SECRET_KEYS.search(key) and value is not None and key != "event":
            event_dict[key] = "***"
        elif isinstance(value, str) and _SECRET_TEXT.search(value):
            event_dict[key] = _SECRET_TEXT.sub("***", value)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", *, force: bool = False) -> None:
    """Choose processors once: `fmt` is `auto` (console on a TTY, else JSON), `json`, `console`."""
    global _configured
    if _configured and not force:
        return
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (uvicorn, apscheduler, alembic) go to stderr too.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
    _configured = True


def get_logger(name: str = "jobqueue", **context: Any) -> Any:
    return structlog.get_logger(name).bind(**context)
