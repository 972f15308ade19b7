"""The daemon's scheduled duties: each a function of a `DutyContext` that moves work forward
and returns how many things it moved (0 means: nothing to do right now)."""

from jobqueue.duties.context import DutyContext

__all__ = ["DutyContext"]
