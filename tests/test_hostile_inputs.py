"""Hostile and careless input files: a fuzz target for the validator (any bytes give a valid job
or a clean refusal naming its line, never a crash or a hang), repeated keys at any depth, and
a corpus of bad files, kinds of file and arguments, each refused in one line with exit 2 and
nothing left in the database or the data dir."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from jobqueue.api import JobQueue
from jobqueue.cli.app import main
from jobqueue.files import dupkeys
from jobqueue.files.inputs import MAX_KEPT_PROBLEMS, InputError, Limits, prepare_input
from jobqueue.store.tables import batches_table, events_table, jobs_table, requests_table

CHAT = "/v1/chat/completions"
FUZZ = settings(
    max_examples=150,
    deadline=2000,  # ms per example: a hang fails it
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def request(cid: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **body},
    }


def _physical_lines(data: bytes) -> int:
    return len(data.splitlines()) if data else 0


def _check_outcome(path: Path, data: bytes, staging: Path) -> InputError | None:
    """Run the validator; it either prepares the file or refuses it cleanly."""
    try:
        prepared = prepare_input(path, CHAT, staging, Limits(max_bytes=4096), sync=False)
    except InputError as err:
        assert not staging.exists()  # nothing left behind
        assert err.total >= 1 and err.problems
        lines = _physical_lines(data)
        for problem in err.problems:
            assert 0 <= problem.line <= max(lines, 1)
            if problem.line == 0:  # only whole-file problems have no line
                assert problem.message == "the file holds no requests"
            assert "\n" not in problem.message and len(problem.message) < 300
        str(err)  # renders
        return err
    assert prepared.requests >= 1
    assert sum(s.requests for s in prepared.shards) == prepared.requests
    for shard in prepared.shards:
        for raw in shard.path.read_bytes().splitlines():
            assert type(orjson.loads(raw)) is dict
    return None


# -- the fuzz target -------------------------------------------------------------------------

_good = [orjson.dumps(request(f"r{i}")) for i in range(3)]
_fragments = st.sampled_from(
    [
        *_good,
        b"",
        b" ",
        b"{",
        b"}",
        b"[]",
        b"null",
        b'"x"',
        b"\xff\xfe",
        b"\xef\xbb\xbf",
        b'{"custom_id":"a","custom_id":"b"}',
        b"\x00",
        b"\r",
        b"NaN",
        b"1e400",
        b"\\ud800",
        b'{"a":' * 300,
        b"x" * 5000,
    ]
)
_lines = st.lists(st.one_of(st.binary(max_size=200), _fragments), max_size=12)


@FUZZ
@given(_lines, st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_fuzz_any_bytes_give_a_job_or_a_clean_refusal(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], eol: bytes, last_eol: bool
) -> None:
    work = tmp_path_factory.mktemp("fuzz")
    data = eol.join(lines) + (eol if last_eol and lines else b"")
    path = work / "in.jsonl"
    path.write_bytes(data)
    _check_outcome(path, data, work / "staging")


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_raw_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    work = tmp_path_factory.mktemp("fuzz")
    path = work / "in.jsonl"
    path.write_bytes(data)
    _check_outcome(path, data, work / "staging")


# -- repeated keys, fuzzed against an oracle ---------------------------------------------------

_keys = st.sampled_from(["a", "b", "model", "custom_id", "é", 'k"q', ""])
_ws = st.sampled_from(["", " ", "\t", "  "])
_strings = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _strings,
)


def _key_text(key: str, escaped: bool) -> str:
    if escaped and key:  # every character as \\uXXXX: the same key, written differently
        return '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"'
    return orjson.dumps(key).decode()


@st.composite
def _json(draw: Any, depth: int = 0) -> tuple[str, bool]:
    """(JSON text, whether some object in it repeats a key)."""
    kind = draw(st.sampled_from(["scalar", "array", "object"] if depth < 3 else ["scalar"]))
    ws = draw(_ws)
    if kind == "scalar":
        return orjson.dumps(draw(_scalars)).decode(), False
    children = draw(st.lists(_json(depth + 1), max_size=3))
    if kind == "array":
        return "[" + ws + ",".join(t for t, _ in children) + "]", any(d for _, d in children)
    keys = draw(st.lists(_keys, min_size=len(children), max_size=len(children)))
    escape = draw(st.lists(st.booleans(), min_size=len(keys), max_size=len(keys)))
    members = [
        f"{_key_text(k, e)}{ws}:{ws}{t}"
        for k, e, (t, _) in zip(keys, escape, children, strict=True)
    ]
    repeated = len(set(keys)) < len(keys) or any(d for _, d in children)
    return "{" + ws + ("," + ws).join(members) + ws + "}", repeated


@st.composite
def _request_line(draw: Any, index: int) -> tuple[bytes, bool]:
    extra, nested_dup = draw(_json())
    body_members = ['"model":"gpt-4o-mini"', f'"extra":{extra}']
    top = [f'"custom_id":"req-{index}"', '"method":"POST"', f'"url":"{CHAT}"']
    dup = nested_dup
    if draw(st.integers(0, 3)) == 0:  # repeat a key of the body
        body_members.append(draw(st.sampled_from(['"model":"gpt-4o"', '"extra":1'])))
        dup = True
    body = "{" + ",".join(body_members) + "}"
    top.append(f'"body":{body}')
    if draw(st.integers(0, 3)) == 0:  # repeat a key of the request, maybe escaped
        key = draw(st.sampled_from(["custom_id", "method", "url", "body"]))
        value = {
            "custom_id": f'"other-{index}"',
            "method": '"POST"',
            "url": f'"{CHAT}"',
            "body": body,
        }[key]
        top.insert(draw(st.integers(0, len(top))), f"{_key_text(key, draw(st.booleans()))}:{value}")
        dup = True
    return ("{" + ",".join(top) + "}").encode(), dup


@FUZZ
@given(st.data())
def test_fuzz_repeated_keys_are_refused_at_any_depth(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    lines = [data.draw(_request_line(i)) for i in range(data.draw(st.integers(1, 5)))]
    work = tmp_path_factory.mktemp("dups")
    path = work / "in.jsonl"
    path.write_bytes(b"\n".join(raw for raw, _ in lines) + b"\n")
    try:
        prepare_input(path, CHAT, work / "staging", sync=False)
        refused: dict[int, list[str]] = {}
    except InputError as err:
        refused = {}
        for problem in err.problems:
            refused.setdefault(problem.line, []).append(problem.message)
    for number, (_, dup) in enumerate(lines, start=1):
        found = any(m.startswith("duplicate key") for m in refused.get(number, []))
        assert found == dup, (number, lines[number - 1], refused)
        if not dup:
            assert number not in refused


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [
                b'{"a":1}',
                b'{"a":1,"a":2}',
                b"",
                b"   ",
                b"x" * 50,
                b"\r",
                b'{"b":{"c":1,"c":1}}',
                b'{"d":' + b'"y"' * 1 + b"}",
            ]
        ),
        max_size=15,
    ),
    st.booleans(),
    st.sampled_from([5, 10, 14, 15, 20, 60, 1000]),
    st.sampled_from([1, 2, 3, 7, 64, 1 << 20]),
)
def test_fuzz_the_block_scanner_numbers_lines_as_the_validator(
    lines: list[bytes], last_eol: bool, limit: int, block: int
) -> None:
    data = b"\n".join(lines) + (b"\n" if last_eol else b"")
    expected: list[tuple[int, str]] = []
    for number, raw in dupkeys.iter_lines(io.BytesIO(data), limit):
        if raw is not None and (problem := dupkeys.duplicate_key_problem(raw)) is not None:
            expected.append((number, problem))
    saved = dupkeys.READ_BUFFER
    dupkeys.READ_BUFFER = block
    try:
        assert dupkeys.scan_file(io.BytesIO(data), limit, 100) == (expected, len(expected))
    finally:
        dupkeys.READ_BUFFER = saved


def test_a_large_file_is_scanned_in_a_child_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(dupkeys, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(dupkeys, "spare_cpu", lambda: True)
    started: list[Any] = []
    real = dupkeys.DuplicateKeyScan

    def spy(*args: Any, **kwargs: Any) -> Any:
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(dupkeys, "DuplicateKeyScan", spy)
    lines = [orjson.dumps(request(f"r{i}")) for i in range(40)]
    lines[7] = (
        b'{"custom_id":"r7","custom_id":"x","method":"POST","url":"%s","body":{"model":"m"}}'
        % CHAT.encode()
    )
    lines[30] = lines[30].replace(b'"model":', b'"model":"a","model":')
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError) as info:
        prepare_input(path, CHAT, tmp_path / "staging", sync=False)
    assert started and started[0]._proc is None  # it ran, and its result was taken
    assert [(p.line, p.message.split(" (")[0]) for p in info.value.problems] == [
        (8, 'duplicate key "custom_id"'),
        (31, 'duplicate key "model"'),
    ]


def test_a_failed_child_falls_back_to_scanning_here(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(dupkeys, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(dupkeys, "spare_cpu", lambda: True)
    monkeypatch.setattr(dupkeys, "_CHILD", "import sys; sys.exit(1)")
    path = tmp_path / "in.jsonl"
    path.write_bytes(orjson.dumps(request("a")).replace(b'"method"', b'"url":"x","method"'))
    with pytest.raises(InputError, match=r'line 1: duplicate key "url"'):
        prepare_input(path, CHAT, tmp_path / "staging", sync=False)


def test_many_repeated_keys_are_counted_and_capped(tmp_path: Path) -> None:
    bad = b'{"custom_id":"a","custom_id":"a","method":"POST","url":"%s","body":{"model":"m"}}'
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b"\n".join(bad.replace(b'"a"', b'"a%d"' % i) % CHAT.encode() for i in range(50)) + b"\n"
    )
    with pytest.raises(InputError) as info:
        prepare_input(path, CHAT, tmp_path / "staging", sync=False)
    assert info.value.total == 50
    assert len(info.value.problems) == MAX_KEPT_PROBLEMS
    assert [p.line for p in info.value.problems] == list(range(1, MAX_KEPT_PROBLEMS + 1))


# -- the corpus, through the command line ------------------------------------------------------


def _nothing_left(db_url: str, data_dir: Path) -> None:
    with JobQueue(database_url=db_url, data_dir=data_dir) as jq, jq.store.read() as conn:
        for table in (jobs_table, batches_table, requests_table, events_table):
            assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0
    jobs = data_dir / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir()), list(jobs.iterdir())


def _submit(tmp_path: Path, capsys, path: Path, *args: str) -> tuple[int, str, str]:
    db_url = f"sqlite:///{tmp_path / 'q.db'}"
    code = main(
        [
            "--database-url",
            db_url,
            "--data-dir",
            str(tmp_path / "data"),
            "submit",
            str(path),
            *(args or ("-e", CHAT)),
        ]
    )
    out, err = capsys.readouterr()
    _nothing_left(db_url, tmp_path / "data")
    return code, out, err


_ok = orjson.dumps(request("ok"))
CORPUS: dict[str, tuple[bytes, str]] = {
    # repeated keys
    "dup-top": (
        b'{"custom_id":"a","custom_id":"b","method":"POST","url":"%s","body":{"model":"m"}}'
        % CHAT.encode(),
        'line 1: duplicate key "custom_id"',
    ),
    "dup-body": (
        _ok.replace(b'"model":', b'"model":"gpt-4o","model":'),
        'line 1: duplicate key "model"',
    ),
    "dup-deep": (
        _ok.replace(b'"role":"user"', b'"role":"user","role":"system"'),
        'line 1: duplicate key "role"',
    ),
    "dup-escaped": (
        _ok.replace(b'{"custom_id"', b'{"custom\\u005fid":"z","custom_id"'),
        'line 1: duplicate key "custom_id"',
    ),
    "dup-same-value": (
        _ok.replace(b'"method":"POST"', b'"method":"POST","method":"POST"'),
        'line 1: duplicate key "method"',
    ),
    "dup-line-3": (
        _ok
        + b"\n"
        + orjson.dumps(request("ok2"))
        + b"\n"
        + orjson.dumps(request("ok3")).replace(b'"url"', b'"url":1,"url"'),
        'line 3: duplicate key "url"',
    ),
    "dup-custom-id": (_ok + b"\n" + _ok, 'line 2: duplicate custom_id "ok" (first on line 1)'),
    # encodings
    "bom": (b"\xef\xbb\xbf" + _ok, "line 1: not valid JSON"),
    "latin-1": (_ok.replace(b'"hi"', b'"h\xe9"'), "line 1: not valid UTF-8 (byte"),
    "utf-16": (_ok.decode().encode("utf-16"), "line 1: not valid UTF-8"),
    "nul": (_ok + b"\x00", "line 1: not valid JSON"),
    "lone-surrogate": (_ok.replace(b'"hi"', b'"\\ud800"'), "line 1: not valid JSON"),
    "nan": (_ok.replace(b'"hi"', b"NaN"), "line 1: not valid JSON"),
    "infinity": (_ok.replace(b'"hi"', b"1e400"), "line 1: not valid JSON"),
    # nesting and shapes
    "deep-nesting": (
        b'{"custom_id":"a","body":' + b"[" * 5000 + b"]" * 5000 + b"}",
        "line 1: not valid JSON",
    ),
    "array": (b"[" + _ok + b"]", "line 1: not a JSON object but an array"),
    "string": (b'"hello"', "line 1: not a JSON object but a string"),
    "truncated": (_ok[:-5], "line 1: not valid JSON"),
    "two-objects": (_ok + _ok, "line 1: not valid JSON"),
    "custom-id-number": (_ok.replace(b'"ok"', b"7"), "custom_id must be a non-empty string"),
    "custom-id-empty": (_ok.replace(b'"ok"', b'""'), "custom_id must be a non-empty string"),
    "unknown-key": (_ok.replace(b'{"custom_id"', b'{"x":1,"custom_id"'), 'unknown key "x"'),
    "method": (_ok.replace(b'"POST"', b'"GET"'), 'method must be "POST"'),
    "url": (_ok.replace(CHAT.encode(), b"/v1/embeddings"), "does not match the endpoint"),
    "body-array": (orjson.dumps({**request("a"), "body": []}), "body must be a JSON object"),
    "no-model": (orjson.dumps({**request("a"), "body": {}}), "body.model is missing"),
    # sizes
    "empty": (b"", "the file holds no requests"),
    "blank-lines": (b"\n  \n\t\r\n", "the file holds no requests"),
    "line-too-long": (orjson.dumps(request("a", pad="x" * 3000)), "line longer than 2048 bytes"),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_corpus_of_bad_files(case: str, tmp_path: Path, capsys) -> None:
    content, expected = CORPUS[case]
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    args = ("-e", CHAT, "--max-batch-bytes", "2048") if case == "line-too-long" else ()
    code, out, err = _submit(tmp_path, capsys, path, *args)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines == [f"error: {path}: {expected}"] or (
        len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and expected in lines[0]
    ), err


def _fifo(path: Path) -> Path:
    os.mkfifo(path)  # no writer: opening it for reading would block for ever
    return path


def _socket_file(path: Path) -> Path:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("fifo", "not a regular file but a FIFO"),
        ("symlink-to-fifo", "not a regular file but a FIFO"),
        ("directory", "not a regular file but a directory"),
        ("device", "not a regular file but a character device"),
        ("socket", "not a regular file but a socket"),
        ("missing", "cannot read the file: No such file or directory"),
        ("dangling-symlink", "cannot read the file: No such file or directory"),
    ],
)
@pytest.mark.timeout(30)
def test_kinds_of_file_are_refused_before_opening(
    kind: str, expected: str, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "input"
    if kind == "fifo":
        _fifo(path)
    elif kind == "symlink-to-fifo":
        path.symlink_to(_fifo(tmp_path / "fifo"))
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = Path("/dev/null")
    elif kind == "socket":
        _socket_file(path)
    elif kind == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere")
    code, out, err = _submit(tmp_path, capsys, path)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: {path}: {expected}"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("-e", "/v1/nothing"), "error: unknown endpoint '/v1/nothing'"),
        (("-e", CHAT, "--max-batch-bytes", "10"), "Invalid value for '--max-batch-bytes'"),
        (("-e", CHAT, "--max-batch-requests", "0"), "Invalid value for '--max-batch-requests'"),
        (("-e", CHAT, "--deadline", "soon"), "error: --deadline:"),
        (("-e", CHAT, "--completion-window", "1h"), "completion window '1h'"),
        (("-e", CHAT, "-m", "novalue"), "expected KEY=VALUE"),
        (("-e", CHAT, "-m", "jobqueue_x=1"), "the prefix 'jobqueue_' is reserved"),
        (("-e", CHAT, "--bogus"), "No such option: --bogus"),
        ((), "Missing option '--endpoint'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    args: tuple[str, ...], expected: str, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(_ok + b"\n")
    db_url = f"sqlite:///{tmp_path / 'q.db'}"
    code = main(
        ["--database-url", db_url, "--data-dir", str(tmp_path / "data"), "submit", str(path), *args]
    )
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    _nothing_left(db_url, tmp_path / "data")
