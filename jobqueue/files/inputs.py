"""Streaming validation and sharding of an input JSONL file.

`prepare_input` reads the user's file once, in constant memory, checks every line against what the
remote accepts, and writes upload-ready shards (one model per shard, within the remote's limits)
into a staging directory. Any problem fails the whole file: every line is still checked, so the
user sees all problems at once, and nothing written is left behind.

Decisions (see also `benchmarks/README.md`):

- Positions are 0-based request ordinals: the n-th request of the file, blank lines not counted.
  Problem line numbers are 1-based physical line numbers.
- Blank (whitespace-only) lines are ignored anywhere in the file: they carry no request, and they
  never reach the remote because shards are rewritten line by line.
- CRLF line endings are accepted and kept: the shard line is byte-for-byte the input line ("\\r"
  is JSON whitespace, so the remote parses it). A last line without its newline gets "\\n".
- Line limit: a line (with its newline) longer than `min(max_line_bytes, max_bytes)` is refused.
  The remote documents no per-line limit, so the only hard bound is that a request must fit in an
  upload file (200 MB). Memory is constant in the number of lines, but one huge line is held in
  memory (and parsed) while it is checked.
- Unknown top-level keys are refused: the remote rejects them. So is a repeated key in any
  object of a line (orjson keeps the last value, another parser may keep the first): see
  `dupkeys`, which scans a large file in a child process while this one validates it.
- Only a regular file is read: anything else (a FIFO, a directory, a device) is refused before
  it is opened, and the open itself never blocks.
- Uniqueness of custom ids is tracked as a set of 60-bit hashes (about 65 MB per million ids, half
  of a set of str); a repeated hash is only a suspect, confirmed or cleared by an exact second pass
  over the file, so a hash collision never reports a false duplicate.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import orjson

from jobqueue import tokens
from jobqueue.core.paths import file_kind
from jobqueue.files import dupkeys
from jobqueue.files.dupkeys import READ_BUFFER as _READ_BUFFER
from jobqueue.files.dupkeys import iter_lines as _iter_lines

__all__ = [
    "ENDPOINTS",
    "InputError",
    "Limits",
    "PreparedInput",
    "Problem",
    "Shard",
    "check_endpoint",
    "prepare_input",
    "shard_request_json",
]

ENDPOINTS: frozenset[str] = frozenset(
    {
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
    }
)
# Moderations pick a default model when none is given; every other endpoint needs one.
_MODEL_OPTIONAL: frozenset[str] = frozenset({"/v1/moderations"})
_EMBEDDINGS = "/v1/embeddings"
_KEYS: frozenset[str] = frozenset({"custom_id", "method", "url", "body"})
_KEY_ORDER = ("custom_id", "method", "url", "body")

MAX_KEPT_PROBLEMS = 20
# More models than this open at once: the least recently used shard is closed early, so file
# handles and write buffers stay bounded whatever the file holds.
MAX_OPEN_SHARDS = 32
_HASH_MASK = (1 << 60) - 1  # 60 bits: the int fits CPython's 2-digit (32-byte) int object
_SHARD_BUFFER = 1 << 18
_IDS_BUFFER = 1 << 16


def check_endpoint(endpoint: str) -> None:
    """Raise ValueError unless `endpoint` is a batch endpoint the remote knows."""
    if endpoint not in ENDPOINTS:
        known = ", ".join(sorted(ENDPOINTS))
        raise ValueError(f"unknown endpoint {endpoint!r}; known endpoints: {known}")


@dataclass(frozen=True)
class Limits:
    max_requests: int = 50_000  # per shard (remote: 50,000 per batch file)
    max_bytes: int = 200 * 1024 * 1024  # per shard file (remote: 200 MB)
    max_embedding_inputs: int = 50_000  # embeddings: inputs in all per shard
    # No per-line limit is documented; a line must at least fit in one upload file.
    max_line_bytes: int = 200 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_bytes", "max_embedding_inputs", "max_line_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")


@dataclass
class Problem:
    line: int  # 1-based; 0 for a problem of the whole file
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class InputError(Exception):
    """The input file was refused; `problems` holds the first ones (in line order), `total` all."""

    def __init__(self, source: Path, problems: list[Problem], total: int | None = None) -> None:
        self.source = source
        self.problems = problems[:MAX_KEPT_PROBLEMS]
        self.total = len(problems) if total is None else total
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.total == 1 and len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"  # one problem, one line
        noun = "problem" if self.total == 1 else "problems"
        lines = [f"{self.source}: {self.total} {noun}"]
        lines += [str(p) for p in self.problems]
        more = self.total - len(self.problems)
        if more > 0:
            lines.append(f"… and {more} more {'problem' if more == 1 else 'problems'}")
        return "\n".join(lines)


@dataclass
class Shard:
    index: int  # 0-based
    path: Path  # upload-ready JSONL, lines byte-for-byte as in the input, each ending in "\n"
    ids_path: Path  # custom ids in shard order, one orjson-encoded JSON string a line
    positions_path: Path | None  # None when contiguous; else one input position a line
    first_position: int  # input position of the shard's first line
    requests: int
    bytes: int
    model: str | None
    # The requests' input tokens (`jobqueue.tokens`' heuristic) and the most output tokens they
    # allow (None: some request sets no bound); estimated from a sample of the requests when
    # `sampled` (see `prepare_input`), else from every one; without an estimate, the rough
    # line bytes // 4 and None.
    estimated_tokens: int
    max_output_tokens: int | None = None
    sampled: bool = False


@dataclass
class PreparedInput:
    staging_dir: Path
    shards: list[Shard]
    requests: int
    bytes: int
    models: list[str] = field(default_factory=list)

    def move_to(self, dest: Path) -> PreparedInput:
        """Rename the staging dir to `dest` (same file system) and return the moved input."""
        self.staging_dir.rename(dest)

        def moved(p: Path) -> Path:
            return dest / p.relative_to(self.staging_dir)

        shards = [
            replace(
                s,
                path=moved(s.path),
                ids_path=moved(s.ids_path),
                positions_path=None if s.positions_path is None else moved(s.positions_path),
            )
            for s in self.shards
        ]
        return replace(self, staging_dir=dest, shards=shards)


def _json_array(path: Path) -> bytes:
    """A file of one JSON value a line as one JSON array (values never hold a raw newline)."""
    data = Path(path).read_bytes()
    return b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]"


def shard_request_json(shard: Shard) -> tuple[str, int | None]:
    """The shard's requests as JSON for a bulk insert, without a Python object per request
    when the shard's positions are contiguous: (array of custom ids, first position). Otherwise
    (array of [position, custom_id] pairs, None)."""
    ids = _json_array(shard.ids_path)
    if shard.positions_path is None:
        return ids.decode(), shard.first_position
    pairs = zip(orjson.loads(_json_array(shard.positions_path)), orjson.loads(ids), strict=True)
    return orjson.dumps(list(pairs)).decode(), None


class _Problems:
    """Counts every problem, keeps the first few."""

    def __init__(self) -> None:
        self.kept: list[Problem] = []
        self.total = 0

    def add(self, line: int, message: str) -> None:
        self.total += 1
        if len(self.kept) < MAX_KEPT_PROBLEMS:
            self.kept.append(Problem(line, message))


class _OpenShard:
    __slots__ = (
        "bytes",
        "f",
        "first_position",
        "ids_f",
        "ids_path",
        "index",
        "inputs",
        "max_output",
        "model",
        "next_position",
        "path",
        "pos_f",
        "positions_path",
        "requests",
        "sampled_bytes",
        "sampled_requests",
        "tokens",
    )

    def __init__(self, staging: Path, index: int, model: str | None, position: int) -> None:
        self.index = index
        self.model = model
        self.path = staging / f"shard-{index:05d}.jsonl"
        self.ids_path = staging / f"shard-{index:05d}.ids"
        self.positions_path = staging / f"shard-{index:05d}.positions"
        self.f: BinaryIO = open(self.path, "xb", buffering=_SHARD_BUFFER)  # noqa: SIM115
        self.ids_f: BinaryIO = open(self.ids_path, "xb", buffering=_IDS_BUFFER)  # noqa: SIM115
        self.pos_f: BinaryIO | None = None  # opened at the first gap
        self.first_position = position
        self.next_position = position
        self.requests = 0
        self.bytes = 0
        self.inputs = 0
        self.tokens: int | None = None  # None: not estimated (bytes // 4)
        self.max_output: int | None = None
        # What the estimate was made from: the bytes and the number of the requests estimated.
        self.sampled_bytes = 0
        self.sampled_requests = 0

    def start_positions(self, next_position: int) -> Callable[[bytes], object]:
        """The next line does not follow the previous one: record positions from now on.

        Writes the contiguous run so far and returns the positions file's write.
        """
        self.pos_f = open(self.positions_path, "xb", buffering=_IDS_BUFFER)  # noqa: SIM115
        for p in range(self.first_position, next_position):
            self.pos_f.write(b"%d\n" % p)
        return self.pos_f.write

    def close(self, sync: bool) -> Shard:
        files = [self.f, self.ids_f] + ([self.pos_f] if self.pos_f else [])
        for f in files:
            f.flush()
            if sync:
                os.fsync(f.fileno())
            f.close()
        return Shard(
            index=self.index,
            path=self.path,
            ids_path=self.ids_path,
            positions_path=self.positions_path if self.pos_f else None,
            first_position=self.first_position,
            requests=self.requests,
            bytes=self.bytes,
            model=self.model,
            estimated_tokens=self.bytes // 4 if self.tokens is None else self._scaled_tokens(),
            max_output_tokens=None if self.tokens is None else self._scaled_output(),
            sampled=self.tokens is not None and self.sampled_requests < self.requests,
        )

    def _scaled_tokens(self) -> int:
        """The input tokens of the requests estimated, scaled to all of them by their bytes."""
        tokens = self.tokens or 0
        if self.sampled_bytes >= self.bytes or not self.sampled_bytes:
            return tokens
        return round(tokens * self.bytes / self.sampled_bytes)

    def _scaled_output(self) -> int | None:
        out = self.max_output
        if out is None or self.sampled_requests >= self.requests or not self.sampled_requests:
            return out
        return round(out * self.requests / self.sampled_requests)

    def abandon(self) -> None:
        for f in (self.f, self.ids_f, self.pos_f):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def _short(value: object) -> str:
    """A parsed JSON value, as JSON, cut to a readable length."""
    text = orjson.dumps(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _json_problem(raw: bytes, err: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as u:
        return f"not valid UTF-8 (byte {u.start + 1})"
    return f"not valid JSON: {err.msg} (column {err.colno})"


def _embedding_inputs(body: dict[str, object]) -> int:
    inp = body.get("input")
    # A list of ints is one token array; any other list holds one input per item.
    if isinstance(inp, list) and inp and not isinstance(inp[0], int):
        return len(inp)
    return 1


def prepare_input(
    source: Path,
    endpoint: str,
    staging_dir: Path,
    limits: Limits = Limits(),
    *,
    sync: bool = True,
    on_shard: Callable[[Shard], None] | None = None,
    estimate_every: int = 0,
) -> PreparedInput:
    """Validate `source` and write its shards into `staging_dir` (created; must be empty).

    Requests' tokens are estimated as their lines are validated (`jobqueue.tokens.estimate` of
    the body, parsed there already): with `estimate_every` 1 every request, and
    `Shard.estimated_tokens` and `Shard.max_output_tokens` sum them; with N > 1 the first
    request of each shard and then one in N (the estimate costs about as much as the rest of
    the validation), the sums scaled to the shard by bytes and by requests (`Shard.sampled`);
    with 0 none, and a shard has its bytes // 4 and no bound.

    `on_shard` is called with each shard as soon as it is complete (closed, and fsynced with
    `sync`), in the order shards complete, while the rest of the file is still being read: the
    caller can start on it (the request index is written this way). A shard handed over may
    still belong to a file that fails later.

    Raises InputError (after scanning the whole file) when the file or any line is refused, and
    then removes everything it wrote, `staging_dir` included. With `sync`, shard files and the
    directory are fsynced before returning, so a caller can commit rows that point at them.
    """
    check_endpoint(endpoint)
    source = Path(source)
    staging_dir = Path(staging_dir)
    f = _open_regular(source)
    with f:
        staging_dir.mkdir(parents=True, exist_ok=True)
        if any(staging_dir.iterdir()):
            raise FileExistsError(f"staging dir {staging_dir} is not empty")
        open_shards: dict[str | None, _OpenShard] = {}
        identity = os.fstat(f.fileno())
        scan = None
        if identity.st_size >= dupkeys.PARALLEL_MIN_BYTES and dupkeys.spare_cpu():
            max_line = min(limits.max_line_bytes, limits.max_bytes)
            scan = dupkeys.DuplicateKeyScan(source, identity, max_line, MAX_KEPT_PROBLEMS)
        try:
            return _prepare(
                f, source, endpoint, staging_dir, limits, sync, open_shards, on_shard, scan,
                tokens.estimate if estimate_every > 0 else None, max(1, estimate_every),
            )  # fmt: skip
        except BaseException:
            if scan is not None:
                scan.cancel()
            for sh in open_shards.values():
                sh.abandon()
            shutil.rmtree(staging_dir, ignore_errors=True)
            raise


def _open_regular(source: Path) -> BinaryIO:
    """Open `source` for reading, refusing what is not a regular file before opening it (a FIFO
    without a writer would block the open for ever) and again after (it may have been swapped
    meanwhile: the open does not block, so that costs nothing)."""

    def refuse(message: str) -> InputError:
        return InputError(source, [Problem(0, message)])

    try:
        mode = os.stat(source).st_mode
    except OSError as e:
        raise refuse(f"cannot read the file: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise refuse(f"not a regular file but {file_kind(mode)}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(source, flags)
    except OSError as e:
        raise refuse(f"cannot read the file: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise refuse(f"not a regular file but {file_kind(mode)}")
    return os.fdopen(fd, "rb", buffering=_READ_BUFFER)


def _check_line(
    obj: dict[str, object], endpoint: str, model_required: bool, embeddings: bool, max_inputs: int
) -> tuple[list[str], str | None, str | None, int]:
    """The slow path: every problem of one parsed line, with its usable custom_id, model, inputs."""
    out: list[str] = []
    missing = [k for k in _KEY_ORDER if k not in obj]
    if missing:
        out.append("missing " + ", ".join(missing))
    extra = [k for k in obj if k not in _KEYS]
    if extra:
        out.append(
            f"unknown key{'s' if len(extra) > 1 else ''} "
            + ", ".join(_short(k) for k in extra)
            + " (allowed: custom_id, method, url, body)"
        )
    cid = obj.get("custom_id")
    if "custom_id" in obj and (type(cid) is not str or not cid):
        out.append(f"custom_id must be a non-empty string, not {_short(cid)}")
    if "method" in obj and obj["method"] != "POST":
        out.append(f'method must be "POST", not {_short(obj["method"])}')
    if "url" in obj and obj["url"] != endpoint:
        out.append(f"url {_short(obj['url'])} does not match the endpoint {endpoint}")
    body = obj.get("body")
    model = None
    inputs = 0
    if type(body) is dict:
        model = body.get("model")
        if model is None and not model_required:
            pass
        elif model is None:
            out.append("body.model is missing")
        elif type(model) is not str or not model:
            out.append(f"body.model must be a non-empty string, not {_short(model)}")
        if embeddings:
            inputs = _embedding_inputs(body)
            if inputs > max_inputs:
                out.append(f"body.input holds {inputs} inputs, more than {max_inputs} allowed")
    elif "body" in obj:
        out.append(f"body must be a JSON object, not {_json_type(body)}")
    return (
        out,
        cid if type(cid) is str and cid else None,
        model if type(model) is str else None,
        inputs,
    )


def _prepare(
    f: BinaryIO,
    source: Path,
    endpoint: str,
    staging: Path,
    limits: Limits,
    sync: bool,
    open_shards: dict[str | None, _OpenShard],
    on_shard: Callable[[Shard], None] | None,
    scan: dupkeys.DuplicateKeyScan | None,
    estimate: Callable[[str, object], tokens.RequestEstimate] | None,
    every: int,
) -> PreparedInput:
    max_line = min(limits.max_line_bytes, limits.max_bytes)
    max_requests, max_bytes = limits.max_requests, limits.max_bytes
    max_inputs = limits.max_embedding_inputs
    model_required = endpoint not in _MODEL_OPTIONAL
    embeddings = endpoint == _EMBEDDINGS
    problems = _Problems()
    add = problems.add
    failed = False  # once a line fails, shards are no longer written: the file fails anyway
    loads, dumps, JSONDecodeError = orjson.loads, orjson.dumps, orjson.JSONDecodeError
    nl_opt = orjson.OPT_APPEND_NEWLINE
    mask = _HASH_MASK
    seen: set[int] = set()
    suspects: set[int] = set()
    done: list[Shard] = []

    def finish(shard: _OpenShard) -> None:
        """Close a complete shard and hand it over."""
        closed = shard.close(sync)
        done.append(closed)
        if on_shard is not None:
            on_shard(closed)

    models: dict[str, None] = {}  # first-appearance order
    seen_add = seen.add
    next_index = 0
    position = 0  # request ordinal of the current line
    cur: _OpenShard | None = None
    cur_model: str | None = None
    c_req = c_bytes = c_in = c_next = 0
    c_tok = 0  # the current shard's estimated input tokens and output bound (None: unbounded)
    c_out: int | None = 0
    c_sb = c_sn = 0  # the bytes and the number of its requests estimated
    # The current shard's writes (set with `cur`, before the first line is written).
    c_write: Callable[[bytes], object]
    c_ids_write: Callable[[bytes], object]
    c_pos_write: Callable[[bytes], object] | None = None

    # Same reading as `_iter_lines`, inlined: a generator costs a tenth of the per-line budget.
    # readline(limit) returns at most `limit` bytes, so an overlong line never sits in memory
    # whole; it is skipped in chunks. `limit` counts the newline, present or added.
    readline = f.readline
    lineno = 0
    while True:
        raw = readline(max_line)
        if not raw:
            break
        lineno += 1
        if raw[-1] != 10:  # b"\n"
            if len(raw) >= max_line:
                while raw and raw[-1] != 10:
                    raw = readline(_READ_BUFFER)
                add(lineno, f"line longer than {max_line} bytes")
                failed = True
                continue
            raw += b"\n"  # the last line, without its newline
        if raw.isspace():
            continue  # blank lines carry no request
        try:
            obj = loads(raw)
        except JSONDecodeError as e:
            add(lineno, _json_problem(raw, e))
            failed = True
            continue
        if type(obj) is not dict:
            add(lineno, f"not a JSON object but {_json_type(obj)}")
            failed = True
            continue

        # Fast path: a well-formed line, checked in one expression (four keys, and these four
        # present, is exactly the allowed set); anything else is re-checked by `_check_line`.
        cid = obj.get("custom_id")
        body = obj.get("body")
        if (
            len(obj) == 4
            and type(cid) is str
            and cid
            and obj.get("method") == "POST"
            and obj.get("url") == endpoint
            and type(body) is dict
            and type(model := body.get("model")) is str
            and model
        ):
            inputs = _embedding_inputs(body) if embeddings else 0
            if inputs > max_inputs:
                add(lineno, f"body.input holds {inputs} inputs, more than {max_inputs} allowed")
                failed = True
        else:
            messages, cid, model, inputs = _check_line(
                obj, endpoint, model_required, embeddings, max_inputs
            )
            for message in messages:
                add(lineno, message)
            if messages:
                failed = True
        if cid is not None:
            # One probe of the set: a repeated hash leaves its size unchanged. A suspect is
            # confirmed or cleared by the exact pass below; the line is still written, so a
            # cleared hash collision leaves the shards whole.
            n_seen = len(seen)
            seen_add(hash(cid) & mask)
            if len(seen) == n_seen:
                suspects.add(hash(cid) & mask)
        if failed:
            position += 1
            continue

        # The current shard's counters live in locals while lines keep coming for its model
        # (the common case); they go back into the object when the model changes.
        size = len(raw)
        if cur is None or model != cur_model:
            if cur is not None:
                cur.requests, cur.bytes, cur.inputs, cur.next_position = (
                    c_req,
                    c_bytes,
                    c_in,
                    c_next,
                )
                if estimate is not None:
                    cur.tokens, cur.max_output = c_tok, c_out
                    cur.sampled_bytes, cur.sampled_requests = c_sb, c_sn
            cur = open_shards.get(model)
            cur_model = model
            if cur is not None:
                c_req, c_bytes, c_in, c_next = (
                    cur.requests,
                    cur.bytes,
                    cur.inputs,
                    cur.next_position,
                )
                c_tok, c_out = cur.tokens or 0, cur.max_output
                c_sb, c_sn = cur.sampled_bytes, cur.sampled_requests
                c_write, c_ids_write = cur.f.write, cur.ids_f.write
                c_pos_write = cur.pos_f.write if cur.pos_f is not None else None
        if cur is not None and (
            c_req >= max_requests or c_bytes + size > max_bytes or c_in + inputs > max_inputs
        ):
            cur.requests, cur.bytes, cur.inputs, cur.next_position = c_req, c_bytes, c_in, c_next
            if estimate is not None:
                cur.tokens, cur.max_output = c_tok, c_out
                cur.sampled_bytes, cur.sampled_requests = c_sb, c_sn
            finish(open_shards.pop(model))
            cur = None
        if cur is None:
            if len(open_shards) >= MAX_OPEN_SHARDS:
                oldest = min(open_shards, key=lambda m: open_shards[m].next_position)
                finish(open_shards.pop(oldest))
            cur = open_shards[model] = _OpenShard(staging, next_index, model, position)
            cur_model = model
            next_index += 1
            if model is not None:
                models[model] = None
            c_req = c_bytes = c_in = c_tok = c_sb = c_sn = 0
            c_out = 0
            c_next = position
            c_write, c_ids_write, c_pos_write = cur.f.write, cur.ids_f.write, None
        elif position != c_next and c_pos_write is None:
            c_pos_write = cur.start_positions(c_next)
        if c_pos_write is not None:
            c_pos_write(b"%d\n" % position)
        c_write(raw)
        c_ids_write(dumps(cid, option=nl_opt))
        c_req += 1
        c_bytes += size
        c_in += inputs
        if estimate is not None and (every == 1 or not c_sn or position % every == 0):
            guess = estimate(endpoint, body)
            c_tok += guess[0]
            c_sb += size
            c_sn += 1
            if c_out is not None:
                bound = guess[1]
                c_out = None if bound is None else c_out + bound
        position += 1
        c_next = position

    if cur is not None:
        cur.requests, cur.bytes, cur.inputs, cur.next_position = c_req, c_bytes, c_in, c_next
        if estimate is not None:
            cur.tokens, cur.max_output = c_tok, c_out
            cur.sampled_bytes, cur.sampled_requests = c_sb, c_sn
    del seen  # free it before the exact pass
    if position == 0 and not problems.total:
        add(0, "the file holds no requests")
    if suspects:
        _confirm_duplicates(f, max_line, suspects, problems)
    found = scan.result() if scan is not None else None
    if found is None:  # a small file, or the child could not do it
        found = dupkeys.scan_file(f, max_line, MAX_KEPT_PROBLEMS)
    _merge(problems, [Problem(line, message) for line, message in found[0]], found[1])
    if problems.total:
        raise InputError(source, problems.kept, problems.total)
    for model in list(open_shards):
        finish(open_shards.pop(model))
    done.sort(key=lambda s: s.index)
    if sync:
        fd = os.open(staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return PreparedInput(
        staging_dir=staging,
        shards=done,
        requests=position,
        bytes=sum(s.bytes for s in done),
        models=list(models),
    )


def _confirm_duplicates(
    f: BinaryIO, max_line: int, suspects: set[int], problems: _Problems
) -> None:
    """Second pass (over the same open file, from its start): find which suspect hashes are
    true duplicates, naming the first occurrence. Merges them with the first pass's problems."""
    first_line: dict[str, int] = {}
    dups = _Problems()
    f.seek(0)
    for lineno, raw in _iter_lines(f, max_line):
        if raw is None:
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if type(obj) is not dict:
            continue
        cid = obj.get("custom_id")
        if type(cid) is not str or not cid or (hash(cid) & _HASH_MASK) not in suspects:
            continue
        first = first_line.setdefault(cid, lineno)
        if first != lineno:
            dups.add(lineno, f"duplicate custom_id {_short(cid)} (first on line {first})")
    _merge(problems, dups.kept, dups.total)


def _merge(problems: _Problems, more: list[Problem], total: int) -> None:
    """Add `total` problems, of which `more` are the first, keeping line order."""
    if total:
        merged = sorted(problems.kept + more, key=lambda p: p.line)
        problems.kept = merged[:MAX_KEPT_PROBLEMS]
        problems.total += total


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
