"""The mirror job's state table: QEMU's JobSTT and JobVerbTable, in one place.

`TRANSITIONS` says which state may follow which; `VERBS` says in which states
each verb is legal.  MirrorJob checks a verb against VERBS and performs the
move under its lock before the verb returns (one function performs every
transition and raises on an illegal one), so the table alone decides what is
legal, and the control thread never applies a verb later.
"""

from __future__ import annotations

from fastmirror.job.events import JobState

__all__ = ["TRANSITIONS", "VERBS", "PAUSED_STATES", "WORKING_STATES"]

S = JobState
# The state table: QEMU's JobSTT (TRANSITIONS) and JobVerbTable (VERBS).
# state -> states it may move to
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.CREATED: frozenset({S.RUNNING, S.CONCLUDED}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.ABORTING, S.CONCLUDED}),
    S.PAUSED: frozenset({S.RUNNING, S.ABORTING, S.CONCLUDED}),
    S.READY: frozenset({S.STANDBY, S.DRAINING, S.ABORTING, S.CONCLUDED}),
    # STANDBY is phase 2 paused; with a drain asked for (complete() or cancel()
    # before the pause), resume() goes back to DRAINING instead of READY.
    S.STANDBY: frozenset({S.READY, S.DRAINING, S.ABORTING, S.CONCLUDED}),
    S.DRAINING: frozenset({S.STANDBY, S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.CONCLUDED}),
    S.CONCLUDED: frozenset(),
}
# verb -> states where it is allowed
VERBS: dict[str, frozenset[JobState]] = {
    "start": frozenset({S.CREATED}),
    # A drain can be paused, as QEMU pauses a job whose completion is
    # pending: the pause opens the gate to writers again (a VM must not stay
    # frozen while its job is paused), and resume() drains again.  Refusing
    # it instead would leave no way to stop the I/O of a long final drain
    # short of cancel(force=True).
    "pause": frozenset({S.RUNNING, S.READY, S.DRAINING}),
    "resume": frozenset({S.PAUSED, S.STANDBY}),
    # Not in DRAINING: once complete() or cancel() asked for the drain, a
    # complete() is refused (QEMU refuses it after a cancel too), so that a
    # cancel never ends in a pivot.
    "complete": frozenset({S.READY}),
    # Everywhere: on a concluded job, or one already aborting, it does nothing.
    "cancel": frozenset(S),
    "set_speed": frozenset(set(S) - {S.CONCLUDED}),
}
PAUSED_STATES = frozenset({S.PAUSED, S.STANDBY})
WORKING_STATES = frozenset({S.RUNNING, S.READY, S.DRAINING})
