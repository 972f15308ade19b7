"""Azure OpenAI's Batch API (the `/openai/v1` surface), which speaks the OpenAI protocol.

Differences handled here: the `api-key` header instead of a bearer token, an optional
`api-version` query parameter, the Azure request-id headers, and 100,000 requests per file.

Azure routes each request by `body.model`, which must name a Global-Batch *deployment*. Input
lines are written to disk before they reach the provider, so the request bodies must already
name the deployment; `deployments` (model -> deployment) is kept for reference and reporting
(`deployment_for`), not applied to uploaded files.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from jobqueue.remote.openai import DEFAULT_USER_AGENT, OpenAIProvider, _KeyAuth


class AzureOpenAIProvider(OpenAIProvider):
    """`base_url` like `https://<resource>.openai.azure.com/openai/v1`."""

    name = "azure"
    max_requests_per_file = 100_000

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        api_version: str | None = None,
        deployments: Mapping[str, str] | None = None,
    ) -> None:
        self.api_version = api_version
        self.deployments: dict[str, str] = dict(deployments or {})
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            transport=transport,
            sleep=sleep,
            rng=rng,
            user_agent=user_agent,
        )

    def _auth(self) -> httpx.Auth | None:
        return _KeyAuth("api-key", "", self._api_key) if self._api_key else None

    def _params(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        if not self.api_version:
            return params
        return {**(params or {}), "api-version": self.api_version}

    def _request_id(self, headers: Mapping[str, str]) -> str | None:
        return (
            headers.get("x-request-id")
            or headers.get("apim-request-id")
            or headers.get("x-ms-request-id")
        )

    def deployment_for(self, model: str) -> str:
        """The Global-Batch deployment serving `model` (the model name when unmapped)."""
        return self.deployments.get(model, model)
