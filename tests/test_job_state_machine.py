"""The job's verbs against a model of its state table: a hypothesis state
machine drives a real MirrorJob on small files (start, pause, resume,
set_speed, complete, cancel, cancel(force=True), tracked writes) and checks:

- every accepted verb was legal in the model, every refused one raised
  JobStateError and changed nothing;
- after any sequence, resume() where paused then complete() (when ready) or
  cancel() reaches a final event within a bound (liveness);
- after COMPLETED the target equals the source (with a pivot: every write;
  without one, the source as it was when the drain ended).

The model below is written from docs/design.md ("The job") and QEMU's verb table,
not imported from fastmirror.job.  The job moves on by itself in three
places (RUNNING -> READY, the end of a drain, the end of an abort), so the
model keeps the set of states the job may be in and narrows it with what it
observes after each step.

FASTMIRROR_SM_EXAMPLES=300 runs more (random) examples than `make test` does.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from fastmirror import EventType, JobStateError, MirrorJob

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB
LIVENESS = 20.0       # seconds for the final event after the teardown's verbs
MAX_WRITE = 128 * KiB

# ---------------------------------------------------------------------------
# The model: (name, ending).  name is the job's state, CONCLUDED split by its
# final event; ending is the drain asked for in phase 2: "complete" (it
# pivots), "cancel" (it does not) or None.
# ---------------------------------------------------------------------------

FINAL = {"completed", "cancelled"}
PHASE1 = {"running", "paused"}
PHASE2 = {"ready", "standby", "draining"}


def model_verb(m, verb, force=False):
    """The model state after `verb` in model state m, or None if the verb
    must be refused there."""
    name, ending = m
    if verb == "start":
        return ("running", None) if name == "created" else None
    if verb == "set_speed":
        return None if name in FINAL else m
    if verb == "pause":
        return {"running": ("paused", None), "ready": ("standby", None),
                "draining": ("standby", ending)}.get(name)
    if verb == "resume":
        if name == "paused":
            return ("running", None)
        if name == "standby":
            return ("draining", ending) if ending else ("ready", None)
        return None
    if verb == "complete":
        return ("draining", "complete") if name == "ready" else None
    if verb == "cancel":
        if name in FINAL or name == "aborting":
            return m                       # a no-op, never an error
        if name == "created":
            return ("cancelled", None)
        if force or name in PHASE1:
            return ("aborting", ending)
        return ("draining", "cancel")      # phase 2: drain, never a pivot
    raise AssertionError(verb)


def moves_alone(m):
    """Where the job may go without being asked."""
    name, ending = m
    if name == "running":
        return [("ready", None)]
    if name == "draining":
        return [("completed", ending)]
    if name == "aborting":
        return [("cancelled", ending)]
    return []


def closure(states):
    out, todo = set(states), list(states)
    while todo:
        for n in moves_alone(todo.pop()):
            if n not in out:
                out.add(n)
                todo.append(n)
    return out


def observed_name(name):
    return "concluded" if name in FINAL else name


def digest(b) -> str:
    return hashlib.sha256(b).hexdigest()


def file_digest(path, size) -> str:
    with open(path, "rb") as f:
        return digest(f.read(size))


class JobMachine(RuleBasedStateMachine):
    job = None

    @initialize(size_chunks=st.integers(32, 128), tail=st.sampled_from([0, 0, 4096, 1000]),
                seed=st.integers(0, 2 ** 32 - 1),
                buf_size=st.sampled_from([G, 256 * KiB, 1 * MiB]),
                speed=st.sampled_from([0, 0, 1 * MiB, 8 * MiB]),
                io_engine=st.sampled_from(["threads", "auto"]),
                start=st.sampled_from(["no", "yes", "ready", "ready"]))
    def create(self, size_chunks, tail, seed, buf_size, speed, io_engine, start):
        self.dir = tempfile.mkdtemp(prefix="fm-sm-")
        self.src = os.path.join(self.dir, "src.img")
        self.dst = os.path.join(self.dir, "dst.img")
        self.size = size = size_chunks * G + tail
        rng = random.Random(seed)
        with open(self.src, "wb") as f:
            f.truncate(size)
            for _ in range(rng.randrange(1, 6)):      # some data, the rest holes
                length = rng.randrange(1, min(size, 1 * MiB))
                off = rng.randrange(0, size - length)
                f.seek(off)
                f.write(rng.randbytes(length))
        with open(self.src, "rb") as f:
            self.shadow = bytearray(f.read())
        self.candidates: set[str] = set()
        self.job = MirrorJob(self.src, self.dst, granularity=G, buf_size=buf_size,
                             speed=speed, io_engine=io_engine)
        self.possible = {("created", None)}
        if start != "no":
            self.do("start")
        if start == "ready" and speed != 1 * MiB:   # within a second: phase 2 is
            self.job.wait_ready(LIVENESS)            # where most verbs differ
            self.observe(self.possible)

    # -- checking one verb against the model ----------------------------------

    def observe(self, states):
        """Narrow `states` with the job's state (and final event) as seen now."""
        states = closure(states)
        st = self.job.status()            # one snapshot, taken under the job's lock
        state = st.state
        assert st.paused == (state in ("paused", "standby")), st
        if state in PHASE2:
            # Phase 2 reads as done; what is pending shows in dirty_bytes.
            assert st.ready and st.offset == st.len, st
        elif state in PHASE1:
            assert not st.ready, st
        seen = {m for m in states if observed_name(m[0]) == state}
        assert seen, "job is %s; the model allows only %s" % (state, sorted(states))
        if state == "concluded":
            final = self.job.wait(0)
            assert final is not None
            name = {EventType.COMPLETED: "completed",
                    EventType.CANCELLED: "cancelled"}.get(final.type)
            assert name is not None, "job ended %s: %r" % (final.type.value, final.error)
            seen = {m for m in seen if m[0] == name}
            assert seen, "job ended %s; the model allows only %s" % (name, sorted(states))
            if name == "completed":
                assert st.offset == st.len and st.dirty_bytes == 0, st
                pivot = self.job.source.pivoted
                seen = {m for m in seen if (m[1] == "complete") == pivot}
                assert seen, "pivot=%s; the model allows only %s" % (pivot, sorted(states))
        self.possible = seen

    def do(self, verb, *args, force=False):
        before = closure(self.possible)
        call = getattr(self.job, verb)
        state_before = self.job.state
        try:
            call(*args, force=True) if force else call(*args)
        except JobStateError:
            legal_nowhere = {m for m in before if model_verb(m, verb, force) is None}
            assert legal_nowhere, "%s refused, but the model allows it in every state of %s" % (
                verb, sorted(before))
            # Refused: nothing changed (unless the job moved on alone).
            if state_before.value not in ("running", "draining", "aborting"):
                assert self.job.state == state_before, "refused %s moved %s to %s" % (
                    verb, state_before.value, self.job.state.value)
            self.observe(legal_nowhere)
            return False
        event("%s%s accepted in %s" % (verb, "(force)" if force else "", state_before.value))
        legal = {model_verb(m, verb, force) for m in before}
        legal.discard(None)
        assert legal, "%s accepted in a state where the model refuses it: %s" % (
            verb, sorted(before))
        self.observe(legal)
        return True

    # -- rules ----------------------------------------------------------------

    @rule()
    def start(self):
        self.do("start")

    @rule()
    def pause(self):
        self.do("pause")

    @rule()
    def resume(self):
        self.do("resume")

    @rule(speed=st.sampled_from([0, 1 * MiB, 64 * MiB]))
    def set_speed(self, speed):
        self.do("set_speed", speed)

    # The verbs that end a job act on a third of their draws, so that most
    # sequences get somewhere before they end (hypothesis has no weights).
    @rule(act=st.integers(0, 2))
    def complete(self, act):
        if act == 0:
            self.do("complete")

    @rule(act=st.integers(0, 2), force=st.booleans())
    def cancel(self, act, force):
        if act == 0:
            self.do("cancel", force=force)

    @rule(timeout=st.sampled_from([0.05, 0.3]))
    def wait_ready(self, timeout):
        """Let phase 1 go on for a while.  (Not a precondition: those must not
        depend on the job's timing, or hypothesis cannot replay a case.)"""
        if self.job.state.value == "running":
            self.job.wait_ready(timeout)
        self.observe(self.possible)

    @rule(data=st.data())
    def write(self, data):
        length = data.draw(st.integers(1, MAX_WRITE), label="length")
        offset = data.draw(st.integers(0, self.size - length), label="offset")
        payload = random.Random(offset * 31 + length).randbytes(length)
        # A write issued while the job may be draining (held at the gate) or
        # done lands after the drain ended without a pivot: the target then
        # holds the source as it was before this write.
        if any(m[0] in ("draining", "completed") for m in closure(self.possible)):
            self.candidates.add(digest(self.shadow))
        assert self.job.source.pwrite(payload, offset) == length
        self.shadow[offset:offset + length] = payload
        self.observe(self.possible)

    # -- the end ----------------------------------------------------------------

    def teardown(self):
        job = self.job
        if job is None:
            return
        try:
            if job.state.value in ("paused", "standby"):
                assert self.do("resume")
            if job.state.value == "ready":
                assert self.do("complete")
            elif job.state.value != "concluded":
                self.do("cancel")
            final = job.wait(LIVENESS)
            assert final is not None, "no final event %.0f s after the end was asked (%s)" % (
                LIVENESS, job.state.value)
            self.observe(self.possible)
            event("ended %s%s" % (final.type.value, " with pivot" if job.source.pivoted else ""))
            self.check_data(final)
        finally:
            job.close()
            job.source.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def check_data(self, final):
        if final.type == EventType.COMPLETED and self.job.source.pivoted:
            assert file_digest(self.dst, self.size) == digest(self.shadow), \
                "after the pivot the target is not the disk written through job.source"
            return
        assert file_digest(self.src, self.size) == digest(self.shadow), \
            "the source is not what was written through job.source"
        if final.type == EventType.COMPLETED:
            self.candidates.add(digest(self.shadow))
            assert file_digest(self.dst, self.size) in self.candidates, \
                "COMPLETED, but the target is no state of the source"


TestJobMachine = JobMachine.TestCase
_examples = os.environ.get("FASTMIRROR_SM_EXAMPLES")
TestJobMachine.settings = settings(
    max_examples=int(_examples) if _examples else 40,
    stateful_step_count=15,
    deadline=None,
    # `make test` runs the same examples every time: a failure there is a
    # bug to reproduce, not noise; FASTMIRROR_SM_EXAMPLES explores afresh.
    derandomize=not _examples,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
