"""Hook sinks: where events go. One attempt per `deliver` call; the dispatcher owns retries.

Every sink has a stable `name` (the dispatcher keys its delivery records on it), the event
`patterns` it wants, a per-attempt `timeout`, and `max_attempts` before a delivery is
dead-lettered. `deliver(event, body)` returns on success and raises `DeliveryError` otherwise;
`event` is the payload dict (`id, type, created_at, job_id, batch_id, from, to, data`) and `body`
its canonical JSON (`event_body`), computed once and shared by every sink.

Sinks are safe to call from several threads at once. Secrets never reach messages or reprs.
"""

from __future__ import annotations

import contextlib
import copy
import email.utils
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx
import orjson

from jobqueue.core.backoff import backoff
from jobqueue.hooks.patterns import matches
from jobqueue.hooks.signing import secret_key, sign

if TYPE_CHECKING:
    from jobqueue.settings import HookConfig

__all__ = [
    "CommandSink",
    "DeliveryError",
    "PythonSink",
    "Sink",
    "WebhookSink",
    "backoff",
    "build_sinks",
    "close_sinks",
    "event_body",
    "sink_matches",
]

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_ATTEMPTS = 8
_STDERR_TAIL = 500
_BODY_EXCERPT = 200
# Statuses that say "not now" rather than "never": worth another attempt.
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})


class DeliveryError(Exception):
    """One failed delivery attempt.

    `retryable=False` means another attempt cannot help (dead-letter now); `retry_after` is the
    receiver's requested delay in seconds (a `Retry-After` header), for the dispatcher to honour.
    """

    def __init__(
        self, message: str, retryable: bool = True, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


@runtime_checkable
class Sink(Protocol):
    name: str
    patterns: list[str]
    timeout: float
    max_attempts: int

    def deliver(self, event: dict[str, Any], body: bytes) -> None: ...


def sink_matches(sink: Sink, event_type: str) -> bool:
    return matches(sink.patterns, event_type)


def close_sinks(sinks: Iterable[Sink]) -> None:
    """Release what sinks hold (HTTP connection pools); sinks without `close` are skipped."""
    for sink in sinks:
        close = getattr(sink, "close", None)
        if callable(close):
            close()


def event_body(event: Mapping[str, Any]) -> bytes:
    """Canonical JSON for an event: sorted keys, compact, UTF-8 (so signatures are stable)."""
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def _normalise_patterns(patterns: str | Iterable[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _check(timeout: float, max_attempts: int) -> None:
    if not timeout > 0:
        raise ValueError("hook timeout must be positive")
    if max_attempts < 1:
        raise ValueError("hook max_attempts must be at least 1")


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class PythonSink:
    """Calls `fn(event)` in the dispatcher's thread; an exception is a failed attempt.

    `fn` gets a deep copy, so it cannot change what other sinks see. `timeout` is advisory: an
    in-process call cannot be interrupted safely, so it is the callable's job to return promptly.
    A `DeliveryError` raised by `fn` is passed through, keeping its `retryable` flag.
    """

    def __init__(
        self,
        fn: Callable[[dict[str, Any]], object],
        patterns: str | Iterable[str] = "*",
        name: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        _check(timeout, max_attempts)
        self.fn = fn
        self.patterns = _normalise_patterns(patterns)
        qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
        self.name = name or f"python:{getattr(fn, '__module__', '?')}.{qualname}"
        self.timeout = timeout
        self.max_attempts = max_attempts

    def deliver(self, event: dict[str, Any], body: bytes) -> None:
        try:
            self.fn(copy.deepcopy(event))
        except DeliveryError:
            raise
        except Exception as exc:
            raise DeliveryError(_clip(f"{type(exc).__name__}: {exc}", _STDERR_TAIL)) from exc

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"PythonSink(name={self.name!r}, patterns={self.patterns!r})"


# What a command hook gets of the daemon's environment, besides what its config names: never
# the whole environment, which holds the remote's key and the webhook secret.
INHERITED_ENV = ("PATH", "HOME", "LANG")
# First words a shell runs itself: nothing to find on PATH.
_SHELL_WORDS = frozenset({
    ".", ":", "[", "alias", "bg", "break", "case", "cd", "command", "continue", "do", "done",
    "echo", "elif", "else", "esac", "eval", "exit", "export", "false", "fc", "fg", "fi", "for",
    "getopts", "hash", "if", "in", "jobs", "kill", "printf", "pwd", "read", "readonly", "return",
    "set", "shift", "test", "then", "times", "trap", "true", "type", "ulimit", "umask", "unalias",
    "unset", "until", "wait", "while", "{", "}", "!", "(", ")",
})  # fmt: skip
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)


class CommandSink:
    """Runs a shell command per event: event JSON on stdin, details in the environment.

    The command runs under `/bin/sh -c` in its own process group (session), with a minimal
    environment: the daemon's `PATH`, `HOME` and `LANG`, the variables named in `pass_env`
    (when the daemon has them), `env`, and `JOBQUEUE_EVENT_TYPE`, `JOBQUEUE_EVENT_ID`,
    `JOBQUEUE_JOB_ID` and, when the event has one, `JOBQUEUE_BATCH_ID`. Nothing else of the
    daemon's environment reaches it: not the remote's key, not the webhook secret, unless named.
    Exit 0 is success; any other exit fails with the code and the tail of stderr. On timeout the
    whole group gets SIGKILL, so children the command started in the background die with it.
    stdout is discarded.

    The command's program (its first word, after any `NAME=value`) must exist and be executable,
    found on that `PATH` or given as a path, or be a shell builtin: checked here, at start-up.
    """

    def __init__(
        self,
        command: str,
        patterns: str | Iterable[str] = "*",
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        env: Mapping[str, str] | None = None,
        *,
        pass_env: Iterable[str] = (),
        name: str | None = None,
    ) -> None:
        if not command.strip():
            raise ValueError("hook command is empty")
        _check(timeout, max_attempts)
        self.command = command
        self.patterns = _normalise_patterns(patterns)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.env = dict(env or {})
        self.pass_env = list(pass_env)
        self.name = name or f"command:{command}"
        check_command(command, self._base_environment().get("PATH", os.defpath))

    def _base_environment(self) -> dict[str, str]:
        environment = {
            key: os.environ[key] for key in (*INHERITED_ENV, *self.pass_env) if key in os.environ
        }
        environment.setdefault("PATH", os.defpath)
        environment.update(self.env)
        return environment

    def _environment(self, event: Mapping[str, Any]) -> dict[str, str]:
        environment = self._base_environment()
        environment["JOBQUEUE_EVENT_TYPE"] = str(event.get("type") or "")
        environment["JOBQUEUE_EVENT_ID"] = str(event.get("id") or "")
        environment["JOBQUEUE_JOB_ID"] = str(event.get("job_id") or "")
        if event.get("batch_id"):
            environment["JOBQUEUE_BATCH_ID"] = str(event["batch_id"])
        else:
            environment.pop("JOBQUEUE_BATCH_ID", None)  # never a value passed from the daemon
        return environment

    def deliver(self, event: dict[str, Any], body: bytes) -> None:
        try:
            proc = subprocess.Popen(
                self.command,
                shell=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=self._environment(event),
                start_new_session=True,  # own process group, so a timeout can kill it all
                close_fds=True,
            )
        except OSError as exc:
            raise DeliveryError(f"cannot start command: {exc}") from exc
        try:
            # communicate() ignores EPIPE, so a command that never reads stdin is fine.
            _, stderr = proc.communicate(input=body, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(proc)
            raise DeliveryError(f"timed out after {self.timeout:g}s") from None
        except BaseException:
            self._kill_group(proc)  # e.g. KeyboardInterrupt: leave no orphans behind
            raise
        if proc.returncode != 0:
            tail = stderr[-_STDERR_TAIL:].decode("utf-8", "replace").strip()
            code = proc.returncode
            what = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise DeliveryError(f"{what}: {_clip(tail, _STDERR_TAIL)}" if tail else what)

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        # Don't read the pipes: a process that escaped the group could hold them open forever.
        for stream in (proc.stdin, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"CommandSink(name={self.name!r}, patterns={self.patterns!r})"


def check_command(command: str, path: str) -> None:
    """Raise ValueError unless the command's program can run: an executable file, given as a
    path or found on `path`, or a shell builtin. A first word that the shell expands (`$X`,
    a glob, a quote-less subshell) is left to the shell. Messages name the program only, never
    the command's arguments (they may hold a token)."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError as exc:
        raise ValueError(f"hook command is not valid shell: {exc}") from None
    words = [w for w in words if not _ASSIGNMENT.fullmatch(w)]
    if words[:1] == ["exec"]:
        words = words[1:]
    program = words[0] if words else None
    if program is None or program in _SHELL_WORDS or set(program) & set("$`*?[~"):
        return
    if "/" in program:
        if not os.path.exists(program):
            raise ValueError(f"hook command {program!r} does not exist")
        candidate = program
    else:
        found = shutil.which(program, path=path)
        if found is None:
            raise ValueError(f"hook command {program!r} is not found on PATH")
        candidate = found
    if os.path.isdir(candidate):
        raise ValueError(f"hook command {program!r} is a directory")
    if not os.access(candidate, os.X_OK):
        raise ValueError(f"hook command {program!r} is not executable")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class WebhookSink:
    """POSTs the body to `url`, signed with Standard Webhooks headers when there is a secret.

    `webhook-id` is the event id (constant across attempts, so receivers can deduplicate) and
    `webhook-timestamp` is fresh per attempt (so a late retry is not rejected as a replay).
    2xx is success; redirects are not followed and count as failures. `timeout` bounds each
    network phase (connect, write, each read). Failures are retryable, except a 4xx other than
    408/409/425/429: the receiver has rejected this message and repeating it cannot help, so the
    delivery is dead-lettered at once. One connection pool per sink; `close()` releases it.
    """

    def __init__(
        self,
        url: str,
        secret: str | None,
        patterns: str | Iterable[str] = "*",
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        transport: httpx.BaseTransport | None = None,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check(timeout, max_attempts)
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise ValueError("webhook url is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("webhook url must be an absolute http(s) URL")
        if secret is not None:
            secret_key(secret)  # fail at configuration time, not on the first event
        self.url = url
        self._secret = secret
        self._clock = clock  # wall clock for webhook-timestamp; injectable for tests
        self.patterns = _normalise_patterns(patterns)
        self.timeout = timeout
        self.max_attempts = max_attempts
        # Default name leaves out path and query: they often carry tokens (Slack-style URLs).
        port = f":{parsed.port}" if parsed.port else ""
        self.name = name or f"webhook:{parsed.scheme}://{parsed.host}{port}"
        self._client = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"user-agent": "jobqueue-webhooks/1"},
        )

    def deliver(self, event: dict[str, Any], body: bytes) -> None:
        if not event.get("id"):
            raise DeliveryError("event has no id", retryable=False)
        webhook_id = str(event["id"])
        timestamp = int(self._clock())
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "content-type": "application/json",
        }
        if self._secret is not None:
            headers["webhook-signature"] = sign(self._secret, webhook_id, timestamp, body)
        try:
            request = self._client.build_request("POST", self.url, content=body, headers=headers)
            response = self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise DeliveryError(
                f"timed out after {self.timeout:g}s ({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:
            # The message names the failure, never the URL (which may carry a token).
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
        try:
            status = response.status_code
            if 200 <= status < 300:
                return
            excerpt = self._excerpt(response)
        finally:
            response.close()
        retryable = not (400 <= status < 500 and status not in _RETRYABLE_4XX)
        message = f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status}"
        raise DeliveryError(
            message,
            retryable,
            retry_after=_retry_after(response.headers.get("retry-after")),
        )

    @staticmethod
    def _excerpt(response: httpx.Response) -> str:
        # Read only the start of the body: a misbehaving receiver may answer with megabytes.
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size >= 4 * _BODY_EXCERPT:
                    break
        except httpx.HTTPError:
            pass
        return _clip(
            b"".join(chunks)[: 4 * _BODY_EXCERPT].decode("utf-8", "replace"), _BODY_EXCERPT
        )

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"WebhookSink(name={self.name!r}, patterns={self.patterns!r})"


def build_sinks(hook_configs: Iterable[HookConfig]) -> list[Sink]:
    """Sinks for the `[[hooks]]` tables, named by `HookConfig.sink_name`, which must be unique.

    A hook that cannot work (a program that is not there, a bad secret) raises `ConfigError`
    naming its position, so the daemon refuses to start rather than dead-letter every event."""
    sinks: list[Sink] = []
    try:
        _build_into(sinks, hook_configs)
    except BaseException:
        close_sinks(sinks)  # don't leak connection pools of the sinks built before the error
        raise
    return sinks


def _build_into(sinks: list[Sink], hook_configs: Iterable[HookConfig]) -> None:
    from jobqueue.settings import ConfigError

    seen: dict[str, int] = {}
    for index, config in enumerate(hook_configs):
        name = config.sink_name
        if name in seen:
            # The name may embed a URL with a token: point at positions instead.
            raise ConfigError(
                f"hooks[{index}] has the same name as hooks[{seen[name]}]; give one a `name`"
            )
        seen[name] = index
        try:
            sinks.append(_sink_of(config, name))
        except ValueError as exc:
            raise ConfigError(f"hooks[{index}]: {exc}") from None


def _sink_of(config: HookConfig, name: str) -> Sink:
    if config.command:
        return CommandSink(
            config.command,
            config.events,
            timeout=config.timeout,
            max_attempts=config.max_attempts,
            env=config.env,
            pass_env=config.pass_env,
            name=name,
        )
    if config.url:
        secret = config.secret.get_secret_value() if config.secret is not None else None
        return WebhookSink(
            config.url,
            secret,
            config.events,
            timeout=config.timeout,
            max_attempts=config.max_attempts,
            name=name,
        )
    # HookConfig already refuses this; keep the invariant local too.
    raise ValueError("needs exactly one of `command` or `url`")
