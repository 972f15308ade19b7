"""The state machine of remote batches and jobs.

One `transitions.Machine` per kind, shared by every row and never bound to a row: it only
*decides* whether an edge is legal. The database applies the edge as a compare-and-set
(`store.py`), so the machine holds no per-row state and is safe to read from many threads.
"""

from __future__ import annotations

import threading
from collections import Counter
from enum import StrEnum

from transitions import Machine


class BatchStatus(StrEnum):
    QUEUED = "queued"
    SUBMITTING = "submitting"
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


B = BatchStatus
J = JobStatus

# Exactly the edges of DESIGN.md. A remote observation may skip intermediate states.
BATCH_EDGES: dict[BatchStatus, tuple[BatchStatus, ...]] = {
    B.QUEUED: (B.SUBMITTING, B.CANCELLED, B.FAILED),
    B.SUBMITTING: (B.VALIDATING, B.QUEUED, B.FAILED),
    B.VALIDATING: (
        B.IN_PROGRESS,
        B.FINALIZING,
        B.COMPLETED,
        B.FAILED,
        B.EXPIRED,
        B.CANCELLING,
        B.CANCELLED,
    ),
    B.IN_PROGRESS: (B.FINALIZING, B.COMPLETED, B.FAILED, B.EXPIRED, B.CANCELLING, B.CANCELLED),
    B.FINALIZING: (B.COMPLETED, B.EXPIRED, B.FAILED),
    B.CANCELLING: (B.CANCELLED, B.COMPLETED, B.EXPIRED, B.FAILED),
    B.COMPLETED: (),
    B.FAILED: (),
    B.EXPIRED: (),
    B.CANCELLED: (),
}

JOB_EDGES: dict[JobStatus, tuple[JobStatus, ...]] = {
    J.QUEUED: (J.RUNNING, J.FAILED, J.CANCELLED, J.EXPIRED),
    J.RUNNING: (J.COMPLETED, J.FAILED, J.CANCELLED, J.EXPIRED),
    J.COMPLETED: (),
    J.FAILED: (),
    J.CANCELLED: (),
    J.EXPIRED: (),
}

BATCH_TERMINAL = frozenset(s for s, dests in BATCH_EDGES.items() if not dests)
JOB_TERMINAL = frozenset(s for s, dests in JOB_EDGES.items() if not dests)
# Statuses the remote knows about: the ones a reconcile cycle refreshes.
BATCH_REMOTE_OPEN = frozenset({B.VALIDATING, B.IN_PROGRESS, B.FINALIZING, B.CANCELLING})
# The column that stamps the time a batch entered a status.
BATCH_TIME_COLUMN: dict[BatchStatus, str] = {
    B.SUBMITTING: "submitting_at",
    B.VALIDATING: "validating_at",
    B.IN_PROGRESS: "in_progress_at",
    B.FINALIZING: "finalizing_at",
    B.COMPLETED: "completed_at",
    B.FAILED: "failed_at",
    B.EXPIRED: "expired_at",
    B.CANCELLING: "cancelling_at",
    B.CANCELLED: "cancelled_at",
}


class IllegalTransition(Exception):
    """An edge the state machine does not allow. Refused, logged and counted; never applied."""

    def __init__(self, kind: str, source: str, dest: str) -> None:
        super().__init__(f"illegal {kind} transition {source} -> {dest}")
        self.kind = kind
        self.source = source
        self.dest = dest


class StateMachine:
    """Decides legal edges for one kind of row (batch or job), thread-safely.

    The `transitions` machine is built once with `auto_transitions=False`: a trigger is named
    after its destination, so an edge `a -> b` is legal exactly when trigger `b` leaves `a`.
    """

    def __init__(self, kind: str, edges: dict, status_type: type[StrEnum]) -> None:
        self.kind = kind
        self.status_type = status_type
        self._machine = Machine(
            model=None,
            states=[s.value for s in status_type],
            transitions=[
                {"trigger": dest.value, "source": src.value, "dest": dest.value}
                for src, dests in edges.items()
                for dest in dests
            ],
            initial=next(iter(status_type)).value,
            auto_transitions=False,
            send_event=False,
        )
        # Precomputed once: lookups are then plain frozenset reads, safe from any thread.
        self._legal = frozenset(
            (t.source, t.dest)
            for event in self._machine.events.values()
            for ts in event.transitions.values()
            for t in ts
        )
        self._refused: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    @property
    def states(self) -> list[str]:
        return list(self._machine.states)

    def is_legal(self, source: str, dest: str) -> bool:
        return (str(source), str(dest)) in self._legal

    def is_terminal(self, status: str) -> bool:
        return not any(src == str(status) for src, _ in self._legal)

    def check(self, source: str, dest: str) -> None:
        """Raise `IllegalTransition` (and count it) unless `source -> dest` is a legal edge."""
        if not self.is_legal(source, dest):
            with self._lock:
                self._refused[(str(source), str(dest))] += 1
            raise IllegalTransition(self.kind, str(source), str(dest))

    def refused(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._refused)

    def refused_total(self) -> int:
        with self._lock:
            return sum(self._refused.values())


BATCH_MACHINE = StateMachine("batch", BATCH_EDGES, BatchStatus)
JOB_MACHINE = StateMachine("job", JOB_EDGES, JobStatus)
