"""The command line, over the embedded API."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from jobqueue.cli.app import main as run

    return run(argv)
