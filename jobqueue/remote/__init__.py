"""Remote Batch/Files APIs behind one protocol; `make_provider` picks one from the settings."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from jobqueue.remote.azure import AzureOpenAIProvider
from jobqueue.remote.base import (
    BatchPage,
    IncompleteDownloadError,
    NotFoundError,
    PermanentRemoteError,
    Provider,
    RemoteBatch,
    RemoteError,
    RemoteFile,
    RequestCounts,
    TransientRemoteError,
)
from jobqueue.remote.openai import OpenAIProvider

__all__ = [
    "AzureOpenAIProvider",
    "BatchPage",
    "IncompleteDownloadError",
    "NotFoundError",
    "OpenAIProvider",
    "PermanentRemoteError",
    "Provider",
    "RemoteBatch",
    "RemoteError",
    "RemoteFile",
    "RequestCounts",
    "TransientRemoteError",
    "make_provider",
]


def _needs_key(provider: str, base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").lower()
    if provider == "azure":
        return host.endswith(".azure.com")
    return host == "api.openai.com"


def make_provider(settings: Any, **kwargs: Any) -> Provider:
    """The provider for `settings` (`provider`, `base_url`, `api_key`, `request_timeout`,
    `max_retries`). `kwargs` go to the constructor (tests pass `transport`, `sleep`)."""
    kind = getattr(settings, "provider", "openai") or "openai"
    base_url = str(settings.base_url)
    secret: Any = getattr(settings, "api_key", None)
    key = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    key = key or None
    if key is None and _needs_key(kind, base_url):
        raise ValueError(
            f"no API key for {base_url}: set OPENAI_API_KEY (under systemd, the credential "
            "openai_api_key)"
        )
    options: dict[str, Any] = {
        "timeout": float(getattr(settings, "request_timeout", 60.0)),
        "max_retries": int(getattr(settings, "max_retries", 5)),
        **kwargs,
    }
    if kind == "openai":
        return OpenAIProvider(base_url, key, **options)
    if kind == "azure":
        return AzureOpenAIProvider(base_url, key, **options)
    raise ValueError(f"unknown provider {kind!r}: expected 'openai' or 'azure'")
