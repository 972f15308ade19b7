"""Configuration: a TOML file (`--config` or `JOBQUEUE_CONFIG`) and the environment, which wins.

The names of DESIGN.md are interface: `JOBQUEUE_DATABASE_URL`, `JOBQUEUE_DATA_DIR`,
`JOBQUEUE_BASE_URL`, `OPENAI_API_KEY`, `JOBQUEUE_POLL_INTERVAL`, `OPENAI_WEBHOOK_SECRET`.
Every other key is `JOBQUEUE_<KEY>` in the environment and `<key>` in the file. Under systemd the
two secrets may instead come as credentials (`LoadCredential=openai_api_key:…`): files named
`openai_api_key` and `openai_webhook_secret` in `$CREDENTIALS_DIRECTORY`, below the environment.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import re
import shlex
import stat
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from platformdirs import user_data_dir
from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from jobqueue.core.costs import PriceTable
from jobqueue.core.durations import parse_duration
from jobqueue.core.paths import file_kind

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class HookConfig(BaseModel):
    """One `[[hooks]]` table: a shell command or an HTTP webhook for matching events.

    A command runs with a minimal environment: `PATH`, `HOME` and `LANG` of the daemon, the
    variables named in `pass_env`, those set in `env`, and the `JOBQUEUE_EVENT_*` ones; nothing
    else of the daemon's environment (its remote key and webhook secret above all) unless named.
    """

    events: list[str] = Field(default_factory=lambda: ["*"])
    command: str | None = None
    url: str | None = None
    secret: SecretStr | None = None
    timeout: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    name: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    pass_env: list[str] = Field(default_factory=list)

    @field_validator("events", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> HookConfig:
        if bool(self.command) == bool(self.url):
            raise ValueError("a hook needs exactly one of `command` or `url`")
        if self.url is not None:
            check_hook_url(self.url)
        if self.command is not None:
            try:
                shlex.split(self.command)
            except ValueError as exc:
                raise ValueError(f"hook command is not valid shell: {exc}") from None
        if (self.env or self.pass_env) and not self.command:
            raise ValueError("`env` and `pass_env` are for command hooks")
        if self.secret is not None and not self.url:
            raise ValueError("`secret` is for webhook (`url`) hooks")
        for name in [*self.env, *self.pass_env]:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name[:40]!r} is not an environment variable name")
        return self

    @property
    def sink_name(self) -> str:
        """A stable name for deliveries and logs that never spells out a URL's path or query
        or a command's arguments (either may hold a token): host or program, plus a digest."""
        if self.name:
            return self.name
        target = self.command or self.url or ""
        digest = hashlib.sha256(target.encode()).hexdigest()[:10]
        if self.command:
            program = shlex.split(self.command)[0] if self.command.strip() else "command"
            return f"command:{Path(program).name}#{digest}"
        return f"webhook:{urlsplit(target).hostname or 'url'}#{digest}"


def check_hook_url(url: str) -> None:
    """Raise ValueError unless `url` is an absolute http(s) URL with a host. The message never
    repeats the URL: its path or query may hold a token."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise ValueError("hook url is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        scheme = f" (its scheme is {parts.scheme[:20]!r})" if parts.scheme else ""
        raise ValueError(f"hook url must be an http:// or https:// URL{scheme}")
    if not host:
        raise ValueError("hook url has no host")


def parse_listen_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6; an empty host is 127.0.0.1; port 0 is any free
    port) as (host, port). Raises ValueError with a message fit to show after the address."""
    text = address.strip()
    host, sep, port = text.rpartition(":")
    if not sep or (not host and not text.startswith(":")):
        example = f"127.0.0.1:{text}" if text.isdigit() else "127.0.0.1:8089"
        raise ValueError(f"expected HOST:PORT, e.g. {example}")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"the port must be a number, not {port[:20]!r}")
    number = int(port)
    if number > 65535:
        raise ValueError(f"port {number} is out of range (1 to 65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host[:80]!r} is not an IPv6 address") from None
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError("an IPv6 address goes in brackets, e.g. [::1]:8089")
    elif host and not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise ValueError(f"{host[:80]!r} is not a host name or address")
    return host or "127.0.0.1", number


def _duration(value: Any) -> float:
    return parse_duration(value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="JOBQUEUE_", extra="forbid", populate_by_name=True, validate_default=False
    )

    database_url: str | None = None
    data_dir: Path = Field(default_factory=lambda: Path(user_data_dir("jobqueue")))
    base_url: str = "https://api.openai.com/v1"
    provider: Literal["openai", "azure"] = "openai"
    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "api_key")
    )
    webhook_secret: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_WEBHOOK_SECRET", "webhook_secret")
    )
    poll_interval: float = Field(default=30.0, gt=0)
    # Remote calls.
    request_timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    # Jobs.
    max_attempts: int = Field(default=3, ge=1)
    completion_window: str = "24h"
    output_expires_after: float = Field(default=7 * 86400, ge=3600, le=2592000)
    result_retention: float = Field(default=30 * 86400, gt=0)
    # Submission.
    lease_seconds: float = Field(default=300.0, gt=0)
    token_limit_backoff: float = Field(default=300.0, gt=0)
    # One number for every model, or a table by model (`[enqueued_token_limit]`,
    # `"gpt-4o-mini" = 2000000`; `"*"` for the models not named).
    enqueued_token_limit: int | dict[str, int] | None = None
    # Costs: prices over the packaged table (`[prices."model-name"]`, USD per million tokens of
    # `input`, `cached_input`, `output`), and the budget a job gets unless submitted with one.
    prices: dict[str, dict[str, float]] = Field(default_factory=dict)
    max_cost: float | None = Field(default=None, gt=0)
    # Batches one daemon uploads and creates at once (each under its own lease).
    submit_concurrency: int = Field(default=4, ge=1, le=64)
    # Reconcile: list pages instead of one GET per batch above this many open batches.
    list_threshold: int = Field(default=50, ge=0)
    overdue_grace: float = Field(default=3600.0, ge=0)
    stuck_after: float = Field(default=3 * 3600.0, gt=0)
    # Daemon.
    # Every daemon renews its heartbeat this often; one not heard of for `daemon_timeout` is dead
    # and its leases are taken over by the others.
    heartbeat_interval: float = Field(default=5.0, gt=0)
    daemon_timeout: float = Field(default=30.0, gt=0)
    listen: str | None = None
    # The `--listen` server: a bearer token for every route but the signed webhook (a secret,
    # like the two above), the largest webhook body, seconds a client has to send a request's
    # headers and again its body, and how many connections it serves at once.
    metrics_token: SecretStr | None = None
    webhook_max_bytes: int = Field(default=1_000_000, ge=1024)
    http_timeout: float = Field(default=10.0, gt=0)
    http_max_connections: int = Field(default=64, ge=1)
    hooks: list[HookConfig] = Field(default_factory=list)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator(
        "output_expires_after",
        "result_retention",
        "token_limit_backoff",
        "lease_seconds",
        "overdue_grace",
        "stuck_after",
        "heartbeat_interval",
        "daemon_timeout",
        mode="before",
    )
    @classmethod
    def _durations(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("enqueued_token_limit", mode="after")
    @classmethod
    def _token_limit(cls, value: int | dict[str, int] | None) -> int | dict[str, int] | None:
        limits = list(value.values()) if isinstance(value, dict) else [value]
        if any(n is not None and n <= 0 for n in limits):
            raise ValueError("an enqueued-token limit must be a positive number of tokens")
        return value

    @field_validator("prices", mode="after")
    @classmethod
    def _prices(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        from jobqueue.core.costs import price_of

        for model, given in value.items():
            try:
                price_of(given, packaged_prices().price(model))
            except ValueError as exc:
                raise ValueError(f"prices.{model}: {exc}") from None
        return value

    def token_limit_for(self, model: str | None) -> int | None:
        """The enqueued-token limit of `model`'s open batches (None: no limit)."""
        limit = self.enqueued_token_limit
        if not isinstance(limit, dict):
            return limit
        return limit.get(model or "", limit.get("*"))

    def price_table(self) -> PriceTable:
        """The packaged Batch API prices with the config's `[prices]` on top."""
        return packaged_prices().merged(self.prices)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _heartbeat_within_timeout(self) -> Settings:
        if self.heartbeat_interval >= self.daemon_timeout:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval:g}s) must be shorter than "
                f"daemon_timeout ({self.daemon_timeout:g}s)"
            )
        return self

    @field_validator("listen", mode="after")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_listen_address(value)
            except ValueError as exc:
                raise ValueError(f"{value[:80]!r}: {exc}") from None
        return value

    @field_validator("metrics_token", mode="after")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None  # an empty JOBQUEUE_METRICS_TOKEN means none
        return value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments win, then the environment, then systemd credentials, then the file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials:
            sources.append(_CredentialsSource(settings_cls, Path(credentials)))
        path = _CONFIG_PATH.get("path") or os.environ.get("JOBQUEUE_CONFIG")
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'jobqueue.db'}"


_CONFIG_PATH: dict[str, str | None] = {}


@functools.cache
def packaged_prices() -> PriceTable:
    """The price table shipped in the package (`jobqueue/data/prices.toml`)."""
    from jobqueue.core.costs import price_of

    text = resources.files("jobqueue").joinpath("data/prices.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    prices = {name: price_of(entry) for name, entry in data.get("models", {}).items()}
    return PriceTable(prices, data.get("date"), data.get("source"))


# Credential file (systemd `LoadCredential=` id) -> the name the environment gives it.
CREDENTIALS = {"openai_api_key": "OPENAI_API_KEY", "openai_webhook_secret": "OPENAI_WEBHOOK_SECRET"}


class _CredentialsSource(PydanticBaseSettingsSource):
    """The secrets as systemd passes them: one file per credential in `$CREDENTIALS_DIRECTORY`,
    readable by the service's user only and never in its environment (so never inherited by a
    hook command). A missing file is no credential; one that cannot be read is a config error."""

    def __init__(self, settings_cls: type[BaseSettings], directory: Path) -> None:
        super().__init__(settings_cls)
        self.directory = directory

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the files

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in CREDENTIALS.items():
            path = self.directory / name
            try:
                value = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
                raise ValueError(f"cannot read the credential {path}: {reason}") from None
            if value:
                values[field] = value
        return values


class ConfigError(ValueError):
    """The configuration cannot be read or does not validate (or the daemon cannot start with
    it): shown as one line, exit code 2."""


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and the TOML file, with `overrides` on top."""
    if config is not None or os.environ.get("JOBQUEUE_CONFIG"):
        _check_config_file(Path(config if config is not None else os.environ["JOBQUEUE_CONFIG"]))
    _CONFIG_PATH["path"] = str(config) if config is not None else None
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except tomllib.TOMLDecodeError as exc:
        where = _CONFIG_PATH.get("path") or os.environ.get("JOBQUEUE_CONFIG")
        raise ConfigError(f"config file {where} is not valid TOML: {exc}") from None
    except ValueError as exc:
        raise ConfigError(_settings_error(exc)) from None
    finally:
        _CONFIG_PATH.pop("path", None)


def _check_config_file(path: Path) -> None:
    """Refuse what is not a regular file before anything opens it (a FIFO would hang)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        reason = "not found" if isinstance(exc, FileNotFoundError) else exc.strerror
        raise ConfigError(f"config file {reason}: {path}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"config file is not a regular file ({file_kind(mode)}): {path}")


def _settings_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "config"
        message = str(err.get("msg"))
        message = message.removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "invalid configuration: " + "; ".join(parts)
