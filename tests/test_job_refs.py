"""Ids people can type: the short form shown is the shortest unique prefix (six digits at least)
of an id's random part; prefixes work with or without `job_`, of either part of the id; an
ambiguous one lists its matches (exit 2); a job can be named and found by its name."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

import jobqueue.api as api_module
from jobqueue.api import AmbiguousJob, InvalidOptions, JobNotFound, JobQueue
from jobqueue.cli.app import main
from jobqueue.core.ids import random_part, shortest_unique, typed_digits
from tests.factories import chat_file

ENDPOINT = "/v1/chat/completions"
# Two jobs a millisecond apart whose random parts share seven digits, and a third.
CRAFTED = [
    "job_01a2346fa300" + "abcdef123456",
    "job_01a2346fa301" + "abcdef199999",
    "job_01a2346fa302" + "7777aa000000",
]


@pytest.fixture
def queue(db_url: str, tmp_path: Path) -> Iterator[JobQueue]:
    jq = JobQueue(database_url=db_url, data_dir=tmp_path / "data")
    yield jq
    jq.close()


@pytest.fixture
def crafted(queue: JobQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Three jobs with the ids of CRAFTED."""
    ids = iter(CRAFTED)
    real = api_module.new_id
    monkeypatch.setattr(
        api_module, "new_id", lambda prefix: next(ids) if prefix == "job" else real(prefix)
    )
    for i in range(len(CRAFTED)):
        queue.submit(chat_file(tmp_path / f"in{i}.jsonl", 2 + i), ENDPOINT)
    return CRAFTED


def _cli(capsys: pytest.CaptureFixture[str], db_url: str, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--database-url", db_url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_pieces() -> None:
    assert random_part(CRAFTED[0]) == "abcdef123456"
    assert random_part("job_nothex") is None
    assert typed_digits("job_ABCDEF") == "abcdef" and typed_digits("abcdef") == "abcdef"
    assert typed_digits("abc") is None and typed_digits("nightly") is None
    assert shortest_unique("abcdef123456", ["abcdef199999", "7777aa000000"]) == "abcdef12"
    assert shortest_unique("7777aa000000", ["abcdef123456"]) == "7777aa"


def test_short_ids_skip_the_time_and_grow_only_where_needed(
    queue: JobQueue, crafted: list[str]
) -> None:
    shorts = {job.id: job.short_id for job in queue.jobs()}
    assert shorts == {CRAFTED[0]: "abcdef12", CRAFTED[1]: "abcdef19", CRAFTED[2]: "7777aa"}
    assert queue.get(CRAFTED[2]).short_id == "7777aa"


def test_two_jobs_submitted_together_have_short_ids_of_six(queue: JobQueue, tmp_path: Path) -> None:
    a = queue.submit(chat_file(tmp_path / "a.jsonl", 2), ENDPOINT)
    b = queue.submit(chat_file(tmp_path / "b.jsonl", 3), ENDPOINT)
    assert a.id[:12] == b.id[:12]  # their time digits are mostly the same
    assert a.short_id is not None and b.short_id is not None
    assert a.short_id != b.short_id and len(a.short_id) >= 6
    assert a.short_id == random_part(a.id)[: len(a.short_id)]  # type: ignore[index]
    assert queue.get(a.short_id).id == a.id


@pytest.mark.parametrize("ref", ["abcdef12", "job_abcdef12", "ABCDEF12", "abcdef123456",
                                 CRAFTED[0], CRAFTED[0][:18]])  # fmt: skip
def test_prefixes_of_either_part_with_or_without_job(
    queue: JobQueue, crafted: list[str], ref: str
) -> None:
    assert queue.get(ref).id == CRAFTED[0]


def test_an_ambiguous_prefix_lists_its_matches(queue: JobQueue, crafted: list[str]) -> None:
    with pytest.raises(AmbiguousJob) as caught:
        queue.get("abcdef")
    assert {job.id for job in caught.value.matches} == set(CRAFTED[:2])
    assert caught.value.exit_code == 2
    with pytest.raises(AmbiguousJob):
        queue.get("job_01a2346fa3")  # the time digits of all three
    with pytest.raises(JobNotFound):
        queue.get("abcdee")


def test_cli_prints_short_ids_and_lists_an_ambiguous_prefix(
    db_url: str, queue: JobQueue, crafted: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, db_url, "status")
    assert code == 0
    assert {"abcdef12", "abcdef19", "7777aa"} <= set(out.split())
    code, out, err = _cli(capsys, db_url, "status", "abcdef")
    assert code == 2 and out == ""
    assert "ambiguous" in err and CRAFTED[0] in err and CRAFTED[1] in err
    assert CRAFTED[2] not in err
    code, out, _ = _cli(capsys, db_url, "status", "job_7777aa")
    assert code == 0 and CRAFTED[2] in out
    code, _, err = _cli(capsys, db_url, "cancel", "nothing-like-this")
    assert code == 2 and "no job 'nothing-like-this'" in err


def test_a_job_named_at_submit_is_found_by_its_name(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = chat_file(tmp_path / "in.jsonl", 3)
    code, out, err = _cli(capsys, db_url, "submit", str(source), "-e", ENDPOINT,
                          "--name", "nightly-eval")  # fmt: skip
    assert code == 0 and "nightly-eval" in err
    job_id = out.strip()
    code, out, _ = _cli(capsys, db_url, "status", "nightly-eval", "--json")
    assert code == 0 and f'"id": "{job_id}"' in out and '"name": "nightly-eval"' in out
    code, out, _ = _cli(capsys, db_url, "status")
    assert "nightly-eval" in out
    # A name is one job's.
    other = chat_file(tmp_path / "other.jsonl", 4)
    code, _, err = _cli(capsys, db_url, "submit", str(other), "-e", ENDPOINT, "--name",
                        "nightly-eval")  # fmt: skip
    assert code == 2 and "taken" in err


@pytest.mark.parametrize("name", ["cafe12", "job_x", "", "-dash", "has space", "x" * 65])
def test_names_that_could_be_read_as_ids_or_are_not_names_are_refused(
    queue: JobQueue, tmp_path: Path, name: str
) -> None:
    with pytest.raises(InvalidOptions):
        queue.submit(chat_file(tmp_path / "in.jsonl", 2), ENDPOINT, name=name)
    assert queue.jobs() == []


def test_short_ids_stay_unique_among_many_jobs(queue: JobQueue, tmp_path: Path) -> None:
    source = chat_file(tmp_path / "in.jsonl", 1)
    jobs = [queue.submit(source, ENDPOINT) for _ in range(40)]
    shorts = queue.short_ids(job.id for job in jobs)
    assert len(set(shorts.values())) == 40
    for job_id, short in shorts.items():
        assert queue.get(short).id == job_id
    for a, b in itertools.combinations(shorts.values(), 2):
        assert not a.startswith(b) and not b.startswith(a)
