"""A job's fingerprint: the sha256 of its input file's content and of its options.

`jobqueue process` finds its job again by it after a crash, and `submit` refuses a second open
job with the same one. The file is read once more for it (hashlib's C loop, about 1 GB/s); only
a regular file is read, so a FIFO or a device is left to intake to refuse.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson


def content_sha256(path: Path) -> str | None:
    """The hex sha256 of a regular file's bytes; None for anything else (or a missing file)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def fingerprint(content: str, endpoint: str, options: Mapping[str, Any]) -> str:
    """The hex sha256 of a content hash, an endpoint and the job's resolved options."""
    canonical = orjson.dumps(
        {"content_sha256": content, "endpoint": endpoint, "options": dict(options)},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()
