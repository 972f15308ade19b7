"""Usage and money: token counts by kind, a price table, and what they cost. Pure, no I/O.

Prices are USD per million tokens of each kind at Batch API prices (the packaged table is
`jobqueue/data/prices.toml`, read with the config's `[prices."model-name"]` by
`jobqueue.settings.Settings.price_table`). `input_tokens` counts every prompt token, cached ones
included (as the API reports them), so the cached ones are billed at `cached_input` and the
rest at `input`; `output_tokens` includes the reasoning tokens (billed as output, never twice).
A model without a price has an unknown cost (None), never 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MILLION = 1_000_000
_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")
KINDS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")


@dataclass(frozen=True)
class Usage:
    """Tokens by kind (`input_tokens` includes the cached ones, `output_tokens` the reasoning
    ones)."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, k) + getattr(other, k) for k in KINDS))

    @classmethod
    def of_row(cls, row: Any) -> Usage | None:
        """A batch row's collected usage, or None until it was collected."""
        if row.input_tokens is None and row.output_tokens is None:
            return None
        return cls(*(int(getattr(row, k) or 0) for k in KINDS))

    @classmethod
    def of_remote(cls, usage: Mapping[str, Any] | None) -> Usage | None:
        """The remote batch object's own `usage` (`input_tokens`, `output_tokens` and their
        details), or None when it reported none."""
        if not usage:
            return None
        inp = usage.get("input_tokens", usage.get("prompt_tokens"))
        out = usage.get("output_tokens", usage.get("completion_tokens"))
        if inp is None and out is None:
            return None
        in_details = usage.get("input_tokens_details") or usage.get("prompt_tokens_details") or {}
        out_details = (
            usage.get("output_tokens_details") or usage.get("completion_tokens_details") or {}
        )
        return cls(
            _int(inp),
            _int(in_details.get("cached_tokens")),
            _int(out),
            _int(out_details.get("reasoning_tokens")),
        )

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in KINDS}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True)
class Price:
    """USD per million tokens; `output` None: the model's output has no price (an embedding
    model bills none: 0 output tokens cost 0, any more are unknown)."""

    input: float
    cached_input: float
    output: float | None

    def cost(self, usage: Usage) -> float | None:
        if usage.output_tokens and self.output is None:
            return None
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        total = (usage.input_tokens - cached) * self.input + cached * self.cached_input
        total += usage.output_tokens * (self.output or 0.0)
        return total / MILLION

    def to_dict(self) -> dict[str, float | None]:
        return {"input": self.input, "cached_input": self.cached_input, "output": self.output}


@dataclass(frozen=True)
class Estimate:
    """A cost range: `low` prices the input only, `high` the input and the most output the
    requests allow (None when some request sets no bound, or a price is unknown)."""

    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {"min": round_usd(self.low), "max": round_usd(self.high)}


@dataclass(frozen=True)
class CostEstimate:
    """What a batch (or a job: its batches summed) is estimated to cost before it runs: its
    input tokens (`jobqueue.tokens`), the most output tokens its requests allow (None: some
    request sets no bound), and the cost range at the price table's prices: `cost_min` the
    input alone, `cost_max` the input and the most output (None: a model without a price,
    and for `cost_max` also no output bound). Unknown is None, never 0."""

    input_tokens: int = 0
    max_output_tokens: int | None = 0
    cost_min: float | None = 0.0
    cost_max: float | None = 0.0

    @classmethod
    def of(
        cls, prices: PriceTable, model: str | None, input_tokens: int, max_output: int | None
    ) -> CostEstimate:
        cost = prices.estimate(model, input_tokens, max_output)
        return cls(input_tokens, max_output, cost.low, cost.high)

    @classmethod
    def of_batch(cls, prices: PriceTable, row: Any) -> CostEstimate:
        """A batch row's estimate (its `model`, `estimated_tokens`, `max_output_tokens`)."""
        return cls.of(prices, row.model, int(row.estimated_tokens or 0), row.max_output_tokens)

    def __add__(self, other: CostEstimate) -> CostEstimate:
        out = self.max_output_tokens
        return CostEstimate(
            self.input_tokens + other.input_tokens,
            None
            if out is None or other.max_output_tokens is None
            else out + other.max_output_tokens,
            sum_costs((self.cost_min, other.cost_min)),
            sum_costs((self.cost_max, other.cost_max)),
        )

    def to_data(self) -> dict[str, Any]:
        """As events and JSON carry it (`batch.queued`, `job.queued`, `status --json`)."""
        return {
            "estimated_input_tokens": self.input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "estimated_cost": {"min": round_usd(self.cost_min), "max": round_usd(self.cost_max)},
        }


def submitted_estimate(prices: PriceTable, batches: Iterable[Any]) -> CostEstimate | None:
    """A job's estimate as it was submitted: its first batch of each shard of the input
    (attempt 1; a batch the enqueued-token limit sent back and queued again counts once;
    retries of failed requests not at all), from rows with `number`, `shard_index`,
    `attempt`, `model`, `estimated_tokens` and `max_output_tokens`. None without batches."""
    first: dict[int, Any] = {}
    for row in batches:
        if row.attempt != 1:
            continue
        seen = first.get(row.shard_index)
        if seen is None or row.number < seen.number:
            first[row.shard_index] = row
    if not first:
        return None
    total = CostEstimate()
    for row in first.values():
        total = total + CostEstimate.of_batch(prices, row)
    return total


@dataclass(frozen=True)
class PriceTable:
    prices: dict[str, Price] = field(default_factory=dict)
    date: str | None = None
    source: str | None = None

    def price(self, model: str | None) -> Price | None:
        """The model's price: by its name, else its base name without a date suffix
        (`gpt-4o-mini-2024-07-18` -> `gpt-4o-mini`); None when unknown."""
        if not model:
            return None
        name = model.strip()
        for candidate in (name, name.lower()):
            found = self.prices.get(candidate)
            if found is not None:
                return found
        base = _DATED.sub("", name.lower())
        return self.prices.get(base)

    def cost(self, model: str | None, usage: Usage | None) -> float | None:
        """What `usage` of `model` cost; None when either is unknown."""
        price = self.price(model)
        if price is None or usage is None:
            return None
        return price.cost(usage)

    def estimate(self, model: str | None, input_tokens: int, max_output: int | None) -> Estimate:
        """The cost range of `input_tokens` (none cached) and up to `max_output` tokens out."""
        price = self.price(model)
        if price is None:
            return Estimate(None, None)
        low = price.cost(Usage(input_tokens=input_tokens))
        high = None if max_output is None else price.cost(Usage(input_tokens, 0, max_output, 0))
        return Estimate(low, high)

    def merged(self, overrides: Mapping[str, Mapping[str, float | None]]) -> PriceTable:
        """This table with `overrides` (model -> kind -> USD per million) on top: kinds given
        replace the packaged ones, a new model needs at least `input`."""
        prices = dict(self.prices)
        for model, given in overrides.items():
            before = prices.get(model)
            prices[model] = price_of(given, before)
        return PriceTable(prices, self.date, self.source)


def price_of(given: Mapping[str, Any], before: Price | None = None) -> Price:
    """A `Price` from a table's entry (`input`, `cached_input`, `output`) over `before`.
    Raises ValueError on a missing input price or a negative one."""
    for kind, value in given.items():
        if kind not in ("input", "cached_input", "output"):
            raise ValueError(f"unknown price kind {kind!r} (input, cached_input, output)")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 0
        ):
            raise ValueError(f"{kind} must be a number of USD per million tokens, at least 0")
    inp = given.get("input", before.input if before else None)
    if inp is None:
        raise ValueError("a model's price needs `input` (USD per million tokens)")
    cached = given.get("cached_input", before.cached_input if before else None)
    output = given.get("output", before.output if before else None)
    return Price(
        float(inp),
        float(cached) if cached is not None else float(inp),
        float(output) if output is not None else None,
    )


def usage_data(
    prices: PriceTable, usage_by_model: Mapping[str | None, Usage], source: str
) -> dict[str, Any]:
    """What an event's data says of usage: the tokens summed, their cost (None: unknown, or
    no usage known), per model, and where the counts come from (`source`: "collected", the
    responses' own usage; "remote", the remote batch object's)."""
    if not usage_by_model:
        return {"usage": None, "cost": None, "usage_source": source}
    total = Usage()
    for usage in usage_by_model.values():
        total = total + usage
    costs = {model: prices.cost(model, usage) for model, usage in usage_by_model.items()}
    data: dict[str, Any] = {
        "usage": total.to_dict(),
        "cost": round_usd(sum_costs(costs.values())),
        "usage_source": source,
    }
    if len(usage_by_model) > 1:
        data["usage_by_model"] = [
            {"model": model, **usage.to_dict(), "cost": round_usd(costs[model])}
            for model, usage in usage_by_model.items()
        ]
    return data


def sum_costs(costs: Iterable[float | None]) -> float | None:
    """The total of some costs; None (unknown) when any of them is."""
    total = 0.0
    for cost in costs:
        if cost is None:
            return None
        total += cost
    return total


def round_usd(value: float | None) -> float | None:
    """A cost as events and JSON carry it: float noise rounded off (to 1e-10 USD)."""
    return None if value is None else round(value, 10)


def usd(value: float | None) -> str:
    """A cost as people read it: `$0.0123`, `$12.35`, or `unknown`."""
    if value is None:
        return "unknown"
    if value == 0:
        return "$0"
    if abs(value) < 1:
        return f"${value:.4f}"
    return f"${value:,.2f}"
