"""Tests for jobqueue.files.inputs: validation, sharding, and leaving nothing behind."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from jobqueue import tokens
from jobqueue.files import inputs
from jobqueue.files.inputs import (
    ENDPOINTS,
    InputError,
    Limits,
    Problem,
    Shard,
    check_endpoint,
    prepare_input,
)
from tests.factories import shard_requests

CHAT = "/v1/chat/completions"


def req(cid: str, model: str = "gpt-4o-mini", url: str = CHAT, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
    }


def line(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def write(path: Path, *lines: bytes | dict[str, Any]) -> Path:
    path.write_bytes(b"".join(x if isinstance(x, bytes) else line(x) for x in lines))
    return path


def prepare(tmp_path: Path, *lines: bytes | dict[str, Any], endpoint: str = CHAT, **limits: int):
    src = write(tmp_path / "in.jsonl", *lines)
    return prepare_input(
        src, endpoint, tmp_path / "staging", Limits(**limits), sync=False, estimate_every=1
    )


def refused(tmp_path: Path, *lines: bytes | dict[str, Any], endpoint: str = CHAT) -> InputError:
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(InputError) as info:
        prepare(tmp_path, *lines, endpoint=endpoint)
    assert not (tmp_path / "staging").exists()
    return info.value


def only(err: InputError) -> Problem:
    assert err.total == 1, str(err)
    return err.problems[0]


def shard_lines(shard: Shard) -> list[bytes]:
    return shard.path.read_bytes().splitlines(keepends=True)


# --- endpoints and file-level problems ---


def test_check_endpoint() -> None:
    for e in ENDPOINTS:
        check_endpoint(e)
    with pytest.raises(ValueError, match="/v1/embeddings"):
        check_endpoint("/v1/nope")
    with pytest.raises(ValueError):
        prepare_input(Path("x"), "/v1/nope", Path("y"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        prepare_input(tmp_path / "absent.jsonl", CHAT, tmp_path / "staging")
    assert "absent.jsonl" in str(info.value)
    assert "No such file" in str(info.value)
    assert not (tmp_path / "staging").exists()


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        prepare_input(tmp_path, CHAT, tmp_path / "staging")


def test_empty_file(tmp_path: Path) -> None:
    assert "no requests" in only(refused(tmp_path)).message


def test_only_blank_lines(tmp_path: Path) -> None:
    assert "no requests" in only(refused(tmp_path, b"\n", b"  \n", b"\r\n")).message


def test_nonempty_staging_dir_is_refused_and_kept(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "precious").write_text("x")
    src = write(tmp_path / "in.jsonl", req("a"))
    with pytest.raises(FileExistsError):
        prepare_input(src, CHAT, staging)
    assert (staging / "precious").exists()


# --- line rules, each with its line number ---


def test_invalid_json(tmp_path: Path) -> None:
    p = only(refused(tmp_path, req("a"), b'{"custom_id": \n'))
    assert p.line == 2 and "not valid JSON" in p.message


def test_invalid_utf8(tmp_path: Path) -> None:
    bad = line(req("b")).replace(b"hi", b"h\xff")
    p = only(refused(tmp_path, req("a"), req("c"), bad))
    assert p.line == 3 and "UTF-8" in p.message


def test_not_an_object(tmp_path: Path) -> None:
    p = only(refused(tmp_path, b"[1, 2]\n"))
    assert p.line == 1 and "not a JSON object" in p.message and "array" in p.message


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"custom_id": ""}, "custom_id must be a non-empty string"),
        ({"custom_id": 7}, "custom_id must be a non-empty string"),
        ({"method": "GET"}, 'method must be "POST"'),
        ({"url": "/v1/embeddings"}, "does not match the endpoint /v1/chat/completions"),
        ({"body": [1]}, "body must be a JSON object"),
        ({"extra": 1}, 'unknown key "extra"'),
    ],
)
def test_field_rules(tmp_path: Path, change: dict[str, Any], needle: str) -> None:
    p = only(refused(tmp_path, req("a"), {**req("b"), **change}))
    assert p.line == 2 and needle in p.message, p


@pytest.mark.parametrize("key", ["custom_id", "method", "url", "body"])
def test_missing_key(tmp_path: Path, key: str) -> None:
    obj = req("b")
    del obj[key]
    p = only(refused(tmp_path, req("a"), obj))
    assert p.line == 2 and p.message == f"missing {key}"


def test_model_required(tmp_path: Path) -> None:
    no_model = req("b")
    del no_model["body"]["model"]
    p = only(refused(tmp_path, req("a"), no_model))
    assert p.line == 2 and "body.model is missing" in p.message
    p = only(refused(tmp_path, req("a"), req("b", model="")))
    assert p.line == 2 and "body.model must be a non-empty string" in p.message


def test_moderations_model_optional(tmp_path: Path) -> None:
    mod = "/v1/moderations"
    a = {"custom_id": "a", "method": "POST", "url": mod, "body": {"input": "x"}}
    b = {**a, "custom_id": "b", "body": {"input": "y", "model": "omni-moderation-latest"}}
    prepared = prepare(tmp_path, a, b, a | {"custom_id": "c"}, endpoint=mod)
    assert [(s.model, s.requests) for s in prepared.shards] == [
        (None, 2),
        ("omni-moderation-latest", 1),
    ]
    assert prepared.models == ["omni-moderation-latest"]


def test_duplicate_names_first_line(tmp_path: Path) -> None:
    err = refused(tmp_path, req("a"), req("b"), b"\n", req("a"), req("b"), req("a"))
    assert [(p.line, p.message) for p in err.problems] == [
        (4, 'duplicate custom_id "a" (first on line 1)'),
        (5, 'duplicate custom_id "b" (first on line 2)'),
        (6, 'duplicate custom_id "a" (first on line 1)'),
    ]


def test_hash_collision_is_not_a_duplicate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every id hashes alike: each line is a suspect, the exact pass clears them all.
    monkeypatch.setattr(inputs, "_HASH_MASK", 0)
    prepared = prepare(tmp_path, req("a"), req("b"), req("c"))
    assert prepared.requests == 3
    assert [c for _, c in shard_requests(prepared.shards[0])] == ["a", "b", "c"]
    err = refused(tmp_path / "dup", req("a"), req("b"), req("b"))
    assert [(p.line, p.message) for p in err.problems] == [
        (3, 'duplicate custom_id "b" (first on line 2)')
    ]


def test_line_too_long(tmp_path: Path) -> None:
    src = write(tmp_path / "in.jsonl", req("a"), req("b", pad="x" * 500), req("c"))
    with pytest.raises(InputError) as info:
        prepare_input(src, CHAT, tmp_path / "staging", Limits(max_line_bytes=300))
    p = only(info.value)
    assert p.line == 2 and "longer than 300 bytes" in p.message
    assert not (tmp_path / "staging").exists()


def test_line_limit_counts_the_newline(tmp_path: Path) -> None:
    data = line(req("a"))
    src = write(tmp_path / "in.jsonl", data)
    prepare_input(src, CHAT, tmp_path / "s1", Limits(max_line_bytes=len(data)), sync=False)
    with pytest.raises(InputError):
        prepare_input(src, CHAT, tmp_path / "s2", Limits(max_line_bytes=len(data) - 1))
    # Without its newline the last line still counts one for the "\n" the shard adds.
    src.write_bytes(data[:-1])
    with pytest.raises(InputError):
        prepare_input(src, CHAT, tmp_path / "s3", Limits(max_line_bytes=len(data) - 1))


def test_line_limit_is_at_most_the_shard_limit(tmp_path: Path) -> None:
    src = write(tmp_path / "in.jsonl", req("a", pad="x" * 500))
    with pytest.raises(InputError, match="longer than 200 bytes"):
        prepare_input(src, CHAT, tmp_path / "staging", Limits(max_bytes=200))


def test_embedding_request_over_input_limit(tmp_path: Path) -> None:
    emb = "/v1/embeddings"
    big = {
        "custom_id": "a",
        "method": "POST",
        "url": emb,
        "body": {"model": "m", "input": ["x"] * 5},
    }
    with pytest.raises(InputError, match="5 inputs, more than 4"):
        prepare_input(
            write(tmp_path / "in.jsonl", big), emb, tmp_path / "s", Limits(max_embedding_inputs=4)
        )


def test_all_problems_reported_first_20_then_count(tmp_path: Path) -> None:
    lines = [req(f"ok{i}") if i % 2 else {**req(f"x{i}"), "method": "GET"} for i in range(60)]
    err = refused(tmp_path, *lines)
    assert err.total == 30
    assert [p.line for p in err.problems] == list(range(1, 40, 2))
    text = str(err).splitlines()
    assert str(tmp_path / "in.jsonl") in text[0]
    assert text[1].startswith("line 1: method must be")
    assert len(text) == 22
    assert text[-1] == "… and 10 more problems"


def test_problems_and_duplicates_merge_in_line_order(tmp_path: Path) -> None:
    lines: list[bytes | dict[str, Any]] = [req("dup")] + [req("dup")] * 5 + [b"nope\n"] * 30
    err = refused(tmp_path, *lines)
    assert err.total == 35
    assert [p.line for p in err.problems] == list(range(2, 22))
    assert "duplicate" in err.problems[0].message and "JSON" in err.problems[-1].message


def test_several_problems_on_one_line(tmp_path: Path) -> None:
    err = refused(tmp_path, {**req("a"), "method": "GET", "url": "/v1/x"})
    assert err.total == 2 and all(p.line == 1 for p in err.problems)


# --- line endings and blank lines ---


def test_missing_final_newline(tmp_path: Path) -> None:
    data = line(req("a")) + line(req("b"))[:-1]
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    prepared = prepare_input(src, CHAT, tmp_path / "staging", sync=False)
    assert prepared.shards[0].path.read_bytes() == data + b"\n"
    assert prepared.bytes == len(data) + 1


def test_crlf_accepted_and_kept(tmp_path: Path) -> None:
    a, b = line(req("a"))[:-1] + b"\r\n", line(req("b"))[:-1] + b"\r\n"
    prepared = prepare(tmp_path, a, b"\r\n", b)
    assert shard_lines(prepared.shards[0]) == [a, b]
    assert list(shard_requests(prepared.shards[0])) == [(0, "a"), (1, "b")]


def test_blank_lines_ignored_and_not_counted(tmp_path: Path) -> None:
    prepared = prepare(tmp_path, b"\n", req("a"), b"   \n", b"\t\n", req("b"), b"\n")
    (shard,) = prepared.shards
    assert shard.requests == 2 and shard.positions_path is None
    assert list(shard_requests(shard)) == [(0, "a"), (1, "b")]


# --- sharding ---


def test_single_shard_byte_identical(tmp_path: Path) -> None:
    lines = [line(req(f"r{i}", temperature=i / 10)) for i in range(10)]
    prepared = prepare(tmp_path, *lines)
    (shard,) = prepared.shards
    assert shard.path.read_bytes() == b"".join(lines)
    assert (shard.index, shard.first_position, shard.requests) == (0, 0, 10)
    assert shard.bytes == prepared.bytes == sum(map(len, lines))
    assert shard.model == "gpt-4o-mini" and prepared.models == ["gpt-4o-mini"]
    assert shard.estimated_tokens == sum(tokens.input_tokens(CHAT, orjson.loads(x)["body"])
                                         for x in lines)  # fmt: skip
    assert shard.max_output_tokens is None  # no request bounds its output
    assert shard.positions_path is None
    assert prepared.staging_dir == tmp_path / "staging"


def test_shards_by_request_count(tmp_path: Path) -> None:
    lines = [line(req(f"r{i}")) for i in range(7)]
    prepared = prepare(tmp_path, *lines, max_requests=3)
    assert [s.requests for s in prepared.shards] == [3, 3, 1]
    assert [s.first_position for s in prepared.shards] == [0, 3, 6]
    assert [s.index for s in prepared.shards] == [0, 1, 2]
    assert b"".join(s.path.read_bytes() for s in prepared.shards) == b"".join(lines)
    assert all(s.positions_path is None for s in prepared.shards)
    assert prepared.requests == 7


def test_shards_by_bytes(tmp_path: Path) -> None:
    lines = [line(req(f"r{i}")) for i in range(6)]
    size = len(lines[0])
    assert all(len(x) == size for x in lines)
    prepared = prepare(tmp_path, *lines, max_bytes=2 * size + 1)
    assert [s.requests for s in prepared.shards] == [2, 2, 2]
    assert all(s.bytes == 2 * size for s in prepared.shards)
    assert all(s.path.stat().st_size == s.bytes for s in prepared.shards)


def test_shards_by_embedding_inputs(tmp_path: Path) -> None:
    emb = "/v1/embeddings"

    def e(cid: str, inp: Any) -> dict[str, Any]:
        return {
            "custom_id": cid,
            "method": "POST",
            "url": emb,
            "body": {"model": "m", "input": inp},
        }

    # inputs counted: 3, 1 (a string), 1 (one token array), 2 (two token arrays), 3
    reqs = [
        e("a", ["x", "y", "z"]),
        e("b", "s"),
        e("c", [1, 2, 3]),
        e("d", [[1], [2]]),
        e("f", ["p"] * 3),
    ]
    prepared = prepare(tmp_path, *reqs, endpoint=emb, max_embedding_inputs=5)
    got = [[cid for _, cid in shard_requests(s)] for s in prepared.shards]
    assert got == [["a", "b", "c"], ["d", "f"]]


def test_embedding_limit_ignored_elsewhere(tmp_path: Path) -> None:
    prepared = prepare(tmp_path, req("a", input=[1, 2]), req("b"), max_embedding_inputs=1)
    assert len(prepared.shards) == 1


def test_shards_by_model_with_positions(tmp_path: Path) -> None:
    models = ["m1", "m2", "m1", "m1", "m2", "m3", "m1"]
    lines = [line(req(f"r{i}", model=m)) for i, m in enumerate(models)]
    prepared = prepare(tmp_path, *lines, max_requests=2)
    summary = [(s.index, s.model, s.first_position, s.requests) for s in prepared.shards]
    assert summary == [(0, "m1", 0, 2), (1, "m2", 1, 2), (2, "m1", 3, 2), (3, "m3", 5, 1)]
    assert prepared.models == ["m1", "m2", "m3"]
    want = {0: [0, 2], 1: [1, 4], 2: [3, 6], 3: [5]}
    for s in prepared.shards:
        got = list(shard_requests(s))
        assert got == [(p, f"r{p}") for p in want[s.index]]
        assert shard_lines(s) == [lines[p] for p in want[s.index]]
        if s.positions_path is None:
            assert want[s.index] == list(range(s.first_position, s.first_position + s.requests))
        else:
            assert s.positions_path.read_bytes() == b"".join(b"%d\n" % p for p in want[s.index])
    # m3 is a single line, m1's first shard has a gap: positions only where needed.
    assert prepared.shards[3].positions_path is None
    assert prepared.shards[0].positions_path is not None


def test_gap_after_a_contiguous_run(tmp_path: Path) -> None:
    models = ["a", "a", "a", "b", "a"]
    prepared = prepare(tmp_path, *[req(f"r{i}", model=m) for i, m in enumerate(models)])
    first = prepared.shards[0]
    assert first.positions_path is not None
    assert first.positions_path.read_text() == "0\n1\n2\n4\n"


def test_many_models_bounded_open_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "MAX_OPEN_SHARDS", 2)
    models = ["a", "b", "c", "a", "b", "c"]
    prepared = prepare(tmp_path, *[req(f"r{i}", model=m) for i, m in enumerate(models)])
    assert sum(s.requests for s in prepared.shards) == 6
    assert all(len({s.model}) == 1 for s in prepared.shards)
    seen = sorted(p for s in prepared.shards for p, _ in shard_requests(s))
    assert seen == list(range(6))


def test_estimates_made_while_validating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shard sums its own requests' estimates, through model switches, shards closed early
    (too many models open) and shards cut at their limit; `estimate=False` keeps bytes // 4."""
    monkeypatch.setattr(inputs, "MAX_OPEN_SHARDS", 2)
    models = ["a", "b", "a", "c", "b", "a", "a", "c", "a", "b"]
    reqs = [
        req(
            f"r{i}",
            model=m,
            max_tokens=10 * (i + 1),
            messages=[{"role": "user", "content": "x" * i * 7}],
        )
        for i, m in enumerate(models)
    ]
    reqs[7]["body"].pop("max_tokens")  # one of c's requests sets no bound
    prepared = prepare(tmp_path, *reqs, max_requests=2)
    assert sum(s.requests for s in prepared.shards) == len(reqs)
    for shard in prepared.shards:
        bodies = [reqs[p]["body"] for p, _ in shard_requests(shard)]
        assert shard.estimated_tokens == sum(tokens.input_tokens(CHAT, b) for b in bodies)
        bounds = [b.get("max_tokens") for b in bodies]
        assert shard.max_output_tokens == (None if None in bounds else sum(bounds))
    assert [s.max_output_tokens for s in prepared.shards if s.model == "c"].count(None) == 1
    assert not any(s.sampled for s in prepared.shards)
    rough = prepare_input(write(tmp_path / "again.jsonl", *reqs), CHAT, tmp_path / "rough",
                          Limits(max_requests=2), sync=False, estimate_every=0)  # fmt: skip
    assert all(s.estimated_tokens == s.bytes // 4 for s in rough.shards)
    assert all(s.max_output_tokens is None for s in rough.shards)


def test_estimates_from_a_sample_are_scaled_to_the_shard(tmp_path: Path) -> None:
    """With `estimate_every` N, each shard's first request and then the requests at positions
    that N divides are estimated; their sums are scaled by bytes (input) and by requests (the
    output bound), and the shard says it was sampled."""
    models = ["a", "b", "a", "a", "b", "a", "a", "a", "b", "a", "a", "a", "a", "b", "a"]
    reqs = [
        req(f"r{i}", model=m, max_tokens=5 + i,
            messages=[{"role": "user", "content": "word " * (3 + 11 * i % 17)}])
        for i, m in enumerate(models)
    ]  # fmt: skip
    source = write(tmp_path / "in.jsonl", *reqs)
    sizes = [len(line) for line in source.read_bytes().splitlines(keepends=True)]
    prepared = prepare_input(source, CHAT, tmp_path / "s", sync=False, estimate_every=4)
    assert {s.model for s in prepared.shards} == {"a", "b"}
    for shard in prepared.shards:
        positions = [p for p, _ in shard_requests(shard)]
        picked = [p for i, p in enumerate(positions) if i == 0 or p % 4 == 0]
        assert shard.sampled and len(picked) < len(positions)
        tokens_in = sum(tokens.input_tokens(CHAT, reqs[p]["body"]) for p in picked)
        picked_bytes = sum(sizes[p] for p in picked)
        assert shard.estimated_tokens == round(tokens_in * shard.bytes / picked_bytes)
        bound = sum(reqs[p]["body"]["max_tokens"] for p in picked)
        assert shard.max_output_tokens == round(bound * len(positions) / len(picked))
    every = prepare_input(source, CHAT, tmp_path / "e", sync=False, estimate_every=1)
    assert not any(s.sampled for s in every.shards)


def test_ids_any_character(tmp_path: Path) -> None:
    ids = ['a"b', "line\nbreak", "tab\t", "ünï😀", "\\", " "]
    prepared = prepare(tmp_path, *[req(c) for c in ids])
    (shard,) = prepared.shards
    assert [c for _, c in shard_requests(shard)] == ids
    assert len(shard.ids_path.read_bytes().splitlines()) == len(ids)


def test_move_to(tmp_path: Path) -> None:
    prepared = prepare(tmp_path, req("a", model="x"), req("b", model="y"), req("c", model="x"))
    moved = prepared.move_to(tmp_path / "final")
    assert not (tmp_path / "staging").exists()
    assert all(s.path.parent == tmp_path / "final" and s.path.exists() for s in moved.shards)
    assert list(shard_requests(moved.shards[0])) == [(0, "a"), (2, "c")]


def test_sync_writes(tmp_path: Path) -> None:
    src = write(tmp_path / "in.jsonl", req("a"))
    prepared = prepare_input(src, CHAT, tmp_path / "staging")  # sync=True by default
    assert prepared.shards[0].path.read_bytes() == line(req("a"))


# --- nothing left behind ---


def test_error_after_shards_were_written_removes_everything(tmp_path: Path) -> None:
    lines: list[bytes | dict[str, Any]] = [req(f"r{i}", model=f"m{i % 3}") for i in range(20)]
    err = refused(tmp_path, *lines, b"oops\n")
    assert only(err).line == 21
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_unexpected_failure_removes_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: Any, sync: bool) -> Shard:
        raise OSError("disk full")

    monkeypatch.setattr(inputs._OpenShard, "close", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare(tmp_path, req("a"), req("b"))
    assert not (tmp_path / "staging").exists()


# --- streaming ---


def test_large_file_streams_in_bounded_memory(tmp_path: Path) -> None:
    # ~1 KB lines, as real requests are; tracemalloc makes each allocation slow, hence 40k.
    src = tmp_path / "big.jsonl"
    n = 40_000
    pad = b"x" * 1000
    with open(src, "wb") as f:
        for i in range(n):
            f.write(b'{"custom_id":"%d","method":"POST","url":"/v1/embeddings",' % i)
            f.write(b'"body":{"model":"m","input":"%s"}}\n' % pad)
    size = src.stat().st_size
    tracemalloc.start()
    try:
        prepared = prepare_input(
            src, "/v1/embeddings", tmp_path / "staging", Limits(max_requests=15_000), sync=False
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prepared.requests == n and len(prepared.shards) == 3
    assert prepared.bytes == size
    # What grows is the id hash set (~70 B a request), not the bytes read: the rest is buffers
    # of fixed size (1 MB read, 256 KB + 64 KB per open shard).
    assert peak < size / 8, (peak, size)
