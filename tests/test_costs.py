"""Costs: the price table (packaged, overridden and extended in the config, dated snapshots,
unknown models), the dry run's estimates (which record nothing), a budget refused for a model
without a price, `jobqueue budget`, and `jobqueue cost --by`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from jobqueue import tokens
from jobqueue.api import InvalidOptions, JobQueue
from jobqueue.cli.app import main
from jobqueue.core.costs import Price, PriceTable, Usage, usd
from jobqueue.settings import ConfigError, load_settings, packaged_prices
from jobqueue.store.tables import batches_table, events_table, jobs_table
from tests.factories import chat_line, write_jsonl

ENDPOINT = "/v1/chat/completions"
# A fixed table: the tests price with it, not with the packaged one (whose prices change).
FIXED = {
    "fixed-model": {"input": 2.0, "cached_input": 0.5, "output": 8.0},
    "fixed-embed": {"input": 0.1},
}


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobqueue.toml"
    path.write_text(text)
    return path


# -- the price table ------------------------------------------------------------------------


def test_cost_from_a_fixed_price_table() -> None:
    table = PriceTable({"m": Price(input=2.0, cached_input=0.5, output=8.0)})
    usage = Usage(input_tokens=1_000_000, cached_input_tokens=400_000, output_tokens=250_000,
                  reasoning_tokens=100_000)  # fmt: skip
    # 600k uncached at $2, 400k cached at $0.50, 250k output (reasoning included) at $8.
    assert table.cost("m", usage) == pytest.approx(1.2 + 0.2 + 2.0)
    assert table.cost("m", Usage()) == 0.0
    assert table.cost("m", None) is None  # no usage known yet
    estimate = table.estimate("m", 500_000, 100_000)
    assert (estimate.low, estimate.high) == (pytest.approx(1.0), pytest.approx(1.8))
    assert table.estimate("m", 500_000, None).high is None  # no bound on the output


def test_an_unknown_model_costs_unknown_never_zero() -> None:
    table = packaged_prices()
    assert table.price("no-such-model") is None
    assert table.cost("no-such-model", Usage(input_tokens=10)) is None
    assert table.estimate("no-such-model", 10, 10).low is None
    assert usd(None) == "unknown"
    # An embedding model has no output price: output tokens on it are unknown, not free.
    embed = table.price("text-embedding-3-small")
    assert embed is not None and embed.output is None
    assert embed.cost(Usage(input_tokens=1_000_000)) == pytest.approx(embed.input)
    assert embed.cost(Usage(input_tokens=1, output_tokens=1)) is None


def test_the_packaged_table_has_its_date_source_and_the_current_models() -> None:
    table = packaged_prices()
    assert table.date and table.source and "openai.com" in table.source
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3",
                  "o4-mini", "gpt-5", "gpt-5-mini", "text-embedding-3-small",
                  "text-embedding-3-large", "text-embedding-ada-002"):  # fmt: skip
        price = table.price(model)
        assert price is not None and price.input > 0, model
    # Batch prices: half the standard $0.15 / $0.60 of gpt-4o-mini.
    assert table.price("gpt-4o-mini") == Price(0.075, 0.0375, 0.30)


def test_a_dated_snapshot_falls_back_to_its_base_name() -> None:
    table = packaged_prices()
    assert table.price("gpt-4o-mini-2024-07-18") == table.price("gpt-4o-mini")
    assert table.price("GPT-4o-mini") == table.price("gpt-4o-mini")
    custom = table.merged({"gpt-4o-mini-2024-07-18": {"input": 9.0}})
    assert custom.price("gpt-4o-mini-2024-07-18").input == 9.0  # type: ignore[union-attr]
    assert custom.price("gpt-4o-mini").input == 0.075  # type: ignore[union-attr]


def test_the_config_overrides_and_extends_the_prices(tmp_path: Path) -> None:
    config = _config(tmp_path, """
[prices."gpt-4o-mini"]
output = 0.5

[prices."my-finetune"]
input = 3
output = 12
""")  # fmt: skip
    table = load_settings(config).price_table()
    assert table.price("gpt-4o-mini") == Price(0.075, 0.0375, 0.5)  # only the output replaced
    assert table.price("my-finetune") == Price(3.0, 3.0, 12.0)  # cached defaults to input
    assert table.price("gpt-4o") == packaged_prices().price("gpt-4o")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[prices."new-model"]\noutput = 1\n', "needs `input`"),
        ('[prices."gpt-4o"]\ninput = -1\n', "at least 0"),
        ('[prices."gpt-4o"]\nprompt = 1\n', "unknown price kind"),
    ],
)
def test_a_bad_price_in_the_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = _config(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config)
    code, out, err = _cli(capsys, "--config", str(config), "status")
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_the_enqueued_token_limit_is_a_number_or_a_table_by_model(tmp_path: Path) -> None:
    assert load_settings(enqueued_token_limit=500).token_limit_for("gpt-4o") == 500
    table = load_settings(_config(tmp_path, '[enqueued_token_limit]\n"gpt-4o-mini" = 2000000\n'))
    assert table.token_limit_for("gpt-4o-mini") == 2_000_000
    assert table.token_limit_for("gpt-4o") is None
    star = load_settings(enqueued_token_limit={"gpt-4o": 10, "*": 99})
    assert (star.token_limit_for("gpt-4o"), star.token_limit_for("o3")) == (10, 99)
    with pytest.raises(ConfigError, match="positive"):
        load_settings(enqueued_token_limit={"gpt-4o": 0})


# -- estimates before spending ---------------------------------------------------------------


def _lines(n: int, model: str = "fixed-model", first: int = 0, **body: Any) -> list[dict[str, Any]]:
    lines = [chat_line(i, model) for i in range(first, first + n)]
    for line in lines:
        line["body"].update(body)
    return lines


def test_the_dry_run_estimates_tokens_and_cost_and_records_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _lines(6, max_tokens=100) + _lines(3, "gpt-4o-mini", first=6)
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    db = tmp_path / "jq.db"
    with JobQueue(database_url=f"sqlite:///{db}", data_dir=tmp_path / "data",
                  prices=FIXED) as jq:  # fmt: skip
        plan = jq.plan(source, ENDPOINT, max_batch_requests=4, max_cost=5.0)
        expected_in = sum(tokens.input_tokens(ENDPOINT, line["body"]) for line in lines[:6])
        fixed, mini = plan.by_model
        assert (fixed.model, fixed.requests, fixed.input_tokens) == ("fixed-model", 6, expected_in)
        assert fixed.max_output_tokens == 600
        assert fixed.cost_min == pytest.approx(expected_in * 2.0 / 1e6)
        assert fixed.cost_max == pytest.approx((expected_in * 2.0 + 600 * 8.0) / 1e6)
        assert mini.max_output_tokens is None and mini.cost_max is None  # no bound given
        assert mini.cost_min is not None
        assert plan.cost_min == pytest.approx(fixed.cost_min + mini.cost_min)
        assert plan.cost_max is None and plan.unpriced == ()
        with jq.store.read() as conn:
            for table in (jobs_table, batches_table, events_table):
                assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0
        assert [p.name for p in (tmp_path / "data").iterdir()] == []

    code, out, _ = _cli(capsys, "--database-url", f"sqlite:///{db}", "--data-dir",
                        str(tmp_path / "data"), "submit", str(source), "-e", ENDPOINT,
                        "--dry-run", "--json")  # fmt: skip
    assert code == 0
    printed = json.loads(out)
    assert [m["model"] for m in printed["by_model"]] == ["fixed-model", "gpt-4o-mini"]
    assert printed["by_model"][0]["max_output_tokens"] == 600
    assert printed["unpriced_models"] == ["fixed-model"]  # not in this run's (packaged) prices
    assert printed["cost"] == {"min": None, "max": None}
    assert printed["prices"]["date"] == packaged_prices().date
    code, out, _ = _cli(capsys, "--database-url", f"sqlite:///{db}", "submit", str(source),
                        "-e", ENDPOINT, "--dry-run")  # fmt: skip
    assert code == 0
    assert "estimated cost unknown" in out and "no price for fixed-model" in out
    with JobQueue(database_url=f"sqlite:///{db}", data_dir=tmp_path / "data") as jq:
        assert jq.jobs() == [] and jq.events() == []


# -- budgets at submit -----------------------------------------------------------------------


def test_a_budget_with_a_model_without_a_price_is_refused_at_submit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", _lines(3, "mystery-model"))
    url = f"sqlite:///{tmp_path / 'jq.db'}"
    with JobQueue(database_url=url, data_dir=tmp_path / "data") as jq:
        with pytest.raises(InvalidOptions, match="no price for mystery-model"):
            jq.submit(source, ENDPOINT, max_cost=10)
        assert jq.jobs() == []
        assert not (tmp_path / "data" / "jobs").exists() or not any(
            (tmp_path / "data" / "jobs").iterdir()
        )
        job = jq.submit(source, ENDPOINT)  # without a budget it goes, its cost unknown
        assert job.max_cost is None
    code, out, err = _cli(capsys, "--database-url", url, "submit", str(source), "-e", ENDPOINT,
                          "--max-cost", "10", "--allow-duplicate")  # fmt: skip
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no price for mystery-model" in err
    code, _, err = _cli(capsys, "--database-url", url, "budget", job.id, "5")
    assert code == 2 and "no price for mystery-model" in err


def test_the_config_max_cost_is_the_default_budget(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", _lines(2, "gpt-4o-mini"))
    with JobQueue(database_url=f"sqlite:///{tmp_path / 'jq.db'}", data_dir=tmp_path / "data",
                  max_cost=2.5) as jq:  # fmt: skip
        assert jq.submit(source, ENDPOINT).max_cost == 2.5
        assert jq.submit(source, ENDPOINT, max_cost=7).max_cost == 7.0
        with pytest.raises(InvalidOptions, match="positive"):
            jq.submit(source, ENDPOINT, max_cost=-1)


def test_a_job_without_a_budget_is_estimated_from_a_sample_and_says_so(tmp_path: Path) -> None:
    """Without a budget or a token limit a submit estimates a sample of the requests (the
    queued events say `estimate_sampled`); under a budget, every request, and they say not."""
    source = write_jsonl(tmp_path / "in.jsonl", _lines(40, "gpt-4o-mini", max_tokens=10))
    with JobQueue(database_url=f"sqlite:///{tmp_path / 'jq.db'}", data_dir=tmp_path / "data") as jq:
        for max_cost, sampled in ((None, True), (5.0, False)):
            job = jq.submit(source, ENDPOINT, max_cost=max_cost, allow_duplicate=True)
            queued = [e for e in jq.events(job.id) if e.type.endswith(".queued")]
            assert [e.data["estimate_sampled"] for e in queued] == [sampled, sampled]
            # Sampled or not, the output bound of 40 requests of 10 tokens each.
            assert queued[0].data["max_output_tokens"] == 400


def test_budget_command_sets_and_takes_off_a_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", _lines(2, "gpt-4o-mini"))
    url = f"sqlite:///{tmp_path / 'jq.db'}"
    with JobQueue(database_url=url, data_dir=tmp_path / "data") as jq:
        job = jq.submit(source, ENDPOINT)
    code, out, _ = _cli(capsys, "--database-url", url, "budget", job.id, "12.5", "--json")
    assert code == 0 and json.loads(out)["max_cost"] == 12.5
    code, out, _ = _cli(capsys, "--database-url", url, "budget", job.id, "none")
    assert code == 0 and "budget none" in out
    for bad in ("-3", "0", "lots"):
        code, out, err = _cli(capsys, "--database-url", url, "budget", job.id, bad)
        assert code == 2 and out == "" and "Traceback" not in err
    with JobQueue(database_url=url, data_dir=tmp_path / "data") as jq:
        assert jq.get(job.id).max_cost is None
        jq.cancel(job.id)
        with pytest.raises(InvalidOptions, match="ended"):
            jq.set_budget(job.id, 3)


def test_a_job_from_before_every_submit_estimated_is_estimated_when_given_a_budget(
    tmp_path: Path,
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", _lines(4, max_tokens=50))
    with JobQueue(database_url=f"sqlite:///{tmp_path / 'jq.db'}", data_dir=tmp_path / "data",
                  prices=FIXED) as jq:  # fmt: skip
        job = jq.submit(source, ENDPOINT, max_batch_requests=2)
        real = {b.id: (b.estimated_input_tokens, b.max_output_tokens) for b in job.batches}
        assert all(out == 100 for _, out in real.values())
        with jq.store.write() as conn:  # what an older jobqueue recorded without a budget
            conn.execute(batches_table.update().where(batches_table.c.job_id == job.id)
                         .values(estimated_tokens=batches_table.c.bytes // 4,
                                 max_output_tokens=None))  # fmt: skip
        rough = jq.get(job.id)
        assert all(b.max_output_tokens is None for b in rough.batches)
        assert rough.estimate is not None and rough.estimate.cost_max is None
        again = jq.set_budget(job.id, 10)
        assert {
            b.id: (b.estimated_input_tokens, b.max_output_tokens) for b in again.batches
        } == real
        assert again.estimate is not None and again.estimate.cost_max == pytest.approx(
            sum(_estimated_usd(i, o) for i, o in real.values())
        )


def _estimated_usd(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * 2.0 + output_tokens * 8.0) / 1e6


# -- jobqueue cost ---------------------------------------------------------------------------


def _job_with_usage(
    jq: JobQueue, tmp_path: Path, model: str, team: str, usage: Usage, created_at: float
) -> str:
    """A job whose one batch was collected with `usage` (set directly: what collection sums)."""
    source = write_jsonl(tmp_path / f"{model}-{team}-{created_at}.jsonl", _lines(2, model))
    job = jq.submit(source, ENDPOINT, metadata={"team": team})
    with jq.store.write() as conn:
        conn.execute(jobs_table.update().where(jobs_table.c.id == job.id)
                     .values(created_at=created_at))  # fmt: skip
        for batch in job.batches:
            jq.store.update_batch(conn, batch.id, collected_at=created_at, **usage.to_dict())
    return job.id


def test_cost_sums_across_jobs_by_model_job_and_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'jq.db'}"
    config = _config(tmp_path, """
[prices."fixed-model"]
input = 2.0
cached_input = 0.5
output = 8.0
""")  # fmt: skip
    million = Usage(1_000_000, 0, 1_000_000, 0)  # $10 on fixed-model
    day = 86400.0
    now = time.time()
    with JobQueue(database_url=url, data_dir=tmp_path / "data", config=config) as jq:
        a = _job_with_usage(jq, tmp_path, "fixed-model", "red", million, now - 10 * day)
        b = _job_with_usage(jq, tmp_path, "fixed-model", "blue", million, now - day)
        c = _job_with_usage(jq, tmp_path, "mystery-model", "blue", million, now - day)
        assert jq.get(a).cost == pytest.approx(10.0)
        assert jq.get(c).cost is None and jq.get(c).usage == million  # unknown, not 0

    def cost(*args: str) -> dict[str, Any]:
        code, out, err = _cli(capsys, "--database-url", url, "--config", str(config), "cost",
                              *args, "--json")  # fmt: skip
        assert code == 0, err
        return json.loads(out)

    by_model = cost()
    lines = {line["key"]: line for line in by_model["lines"]}
    assert lines["fixed-model"]["cost"] == pytest.approx(20.0)
    assert lines["fixed-model"]["jobs"] == 2 and lines["fixed-model"]["input_tokens"] == 2_000_000
    assert lines["mystery-model"]["cost"] is None
    assert by_model["total"]["cost"] is None and by_model["unpriced_models"] == ["mystery-model"]
    assert by_model["total"]["jobs"] == 3

    by_job = cost("--by", "job", a, b)
    assert {line["key"]: line["cost"] for line in by_job["lines"]} == {a: 10.0, b: 10.0}
    assert by_job["total"]["cost"] == pytest.approx(20.0)

    for spelling in (["--by", "metadata", "team"], ["--by", "metadata=team"]):
        by_team = cost(*spelling)
        assert {line["key"]: line["cost"] for line in by_team["lines"]} == {
            "red": 10.0, "blue": None,
        }  # fmt: skip
    since = cost("--by", "job", "--since", "3d")
    assert {line["key"] for line in since["lines"]} == {b, c}
    dated = time.strftime("%Y-%m-%d", time.gmtime(now - 5 * day))
    assert {line["key"] for line in cost("--by", "job", "--since", dated)["lines"]} == {b, c}

    code, out, _ = _cli(capsys, "--database-url", url, "--config", str(config), "cost")
    assert code == 0 and "fixed-model" in out and "$20.00" in out and "unknown" in out
    for bad in (["--by", "team"], ["--by", "metadata"], ["--since", "last week"]):
        code, out, err = _cli(capsys, "--database-url", url, "cost", *bad)
        assert code == 2 and out == "" and "Traceback" not in err


def test_status_shows_usage_and_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'jq.db'}"
    with JobQueue(database_url=url, data_dir=tmp_path / "data") as jq:
        job = _job_with_usage(jq, tmp_path, "gpt-4o-mini", "red", Usage(2_000_000, 0, 0, 0),
                              time.time())  # fmt: skip
        jq.set_budget(job, 4)
    _, out, _ = _cli(capsys, "--database-url", url, "status", job, "--json")
    status = json.loads(out)
    assert status["usage"]["input_tokens"] == 2_000_000
    assert status["cost"] == pytest.approx(0.15) and status["max_cost"] == 4.0
    assert status["batches"][0]["usage"]["input_tokens"] == 2_000_000
    assert status["batches"][0]["cost"] == pytest.approx(0.15)
    _, out, _ = _cli(capsys, "--database-url", url, "status", "--json")
    assert json.loads(out)[0]["cost"] == pytest.approx(0.15)
    _, out, _ = _cli(capsys, "--database-url", url, "status")
    assert "COST" in out and "$0.1500" in out and "$4.00" in out
    _, out, _ = _cli(capsys, "--database-url", url, "status", job)
    assert "cost       $0.1500" in out and "budget     $4.00" in out


# -- a budget through `process`, against the emulator ---------------------------------------


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Any:
    from jobqueue.emulator import EmulatorConfig, serve_in_thread
    from tests.daemon_helpers import API_KEY

    with serve_in_thread(EmulatorConfig(time_scale=3600, seed=5, api_key=API_KEY)) as em:
        monkeypatch.setenv("JOBQUEUE_BASE_URL", em.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        monkeypatch.setenv("JOBQUEUE_POLL_INTERVAL", "0.2")
        yield em


@pytest.mark.timeout(180)
def test_process_stops_at_its_budget_and_goes_on_under_a_higher_one(
    emulator: Any, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", _lines(12, "gpt-4o-mini", max_tokens=20))
    out = tmp_path / "out.jsonl"
    base = ["--database-url", db_url, "--data-dir", str(tmp_path / "data")]
    code, plan, _ = _cli(capsys, *base, "submit", str(source), "-e", ENDPOINT,
                         "--max-batch-requests", "4", "--dry-run", "--json")  # fmt: skip
    shards = json.loads(plan)["shards"]
    each = max(shard["cost"]["max"] for shard in shards)
    least = min(shard["cost"]["min"] for shard in shards)  # a batch's input alone
    args = [*base, "process", str(source), "-e", ENDPOINT, "-o", str(out),
            "--max-batch-requests", "4"]  # fmt: skip
    # Room for one batch's estimate and less than another's input: one runs (whatever its
    # output), then the job stops at its budget.
    code, _, err = _cli(capsys, *args, "--max-cost", f"{each + least / 2:.10f}")
    assert code == 4, err
    assert "budget" in err and not out.exists()
    with JobQueue(database_url=db_url, data_dir=tmp_path / "data") as jq:
        (job,) = jq.jobs()
        assert job.problem_kind == "budget"
        statuses = sorted(b.status for b in jq.get(job.id).batches)
        assert statuses == ["completed", "queued", "queued"]
        assert [e.type for e in jq.events(job.id)].count("job.budget_exceeded") == 1
    # The same command with room for all: the same job goes on to its end.
    code, _, err = _cli(capsys, *args, "--max-cost", f"{10 * each:.10f}")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 12
    with JobQueue(database_url=db_url, data_dir=tmp_path / "data") as jq:
        (job,) = jq.jobs()
        assert job.status == "completed" and job.problem is None
