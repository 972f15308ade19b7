"""Configuration: a TOML file (`--config` or `JOBQUEUE_CONFIG`) and the environment, which wins.

The names of DESIGN.md are interface: `JOBQUEUE_DATABASE_URL`, `JOBQUEUE_DATA_DIR`,
`JOBQUEUE_BASE_URL`, `OPENAI_API_KEY`, `JOBQUEUE_POLL_INTERVAL`, `OPENAI_WEBHOOK_SECRET`.
Every other key is `JOBQUEUE_<KEY>` in the environment and `<key>` in the file. Under systemd the
two secrets may instead come as credentials (`LoadCredential=openai_api_key:…`): files named
`openai_api_key` and `openai_webhook_secret` in `$CREDENTIALS_DIRECTORY`, below the environment.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from platformdirs import user_data_dir
from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from jobqueue.core.durations import parse_duration


class HookConfig(BaseModel):
    """One `[[hooks]]` table: a shell command or an HTTP webhook for matching events."""

    events: list[str] = Field(default_factory=lambda: ["*"])
    command: str | None = None
    url: str | None = None
    secret: SecretStr | None = None
    timeout: float = 10.0
    max_attempts: int = Field(default=8, ge=1)
    name: str | None = None

    @field_validator("events", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def model_post_init(self, __context: Any) -> None:
        if bool(self.command) == bool(self.url):
            raise ValueError("a hook needs exactly one of `command` or `url`")

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
    enqueued_token_limit: int | None = Field(default=None, gt=0)
    # Reconcile: list pages instead of one GET per batch above this many open batches.
    list_threshold: int = Field(default=50, ge=0)
    overdue_grace: float = Field(default=3600.0, ge=0)
    stuck_after: float = Field(default=3 * 3600.0, gt=0)
    # Daemon.
    listen: str | None = None
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
        mode="before",
    )
    @classmethod
    def _durations(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

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


class ConfigError(Exception):
    """The configuration cannot be read or does not validate."""


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and the TOML file, with `overrides` on top."""
    if config is not None and not Path(config).is_file():
        raise ConfigError(f"config file not found: {config}")
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


def _settings_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "config"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid configuration: " + "; ".join(parts)
