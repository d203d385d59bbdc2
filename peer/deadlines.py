"""Deadlines of averaging rounds that follow the links' measured speed. Pure: no clock, no I/O.

A fixed deadline is wrong for most links: long enough for a slow link and the survivors of a dead peer
wait that long on a fast one; short enough for a fast link and every round on a slow one is abandoned.
A peer therefore times its own all-reduce rounds and derives two deadlines from the slowest recent one:

- the *chunk* deadline: a member that sends nothing for this long is dropped from the round (hivemind's
  ``next_chunk_timeout``; a reducer gets 1.5 times that). Also the per-chunk deadline of a state download,
  after which the download moves to another donor. ``factor`` times the slowest recent round, at least
  ``floor`` (so that a busy CPU's pause is not taken for a dead peer), at most a third of ``ceiling``;
- the *round* deadline: an all-reduce attempt still running after it is abandoned (and retried with the
  members left while the step's time lasts). Three chunk deadlines, at most ``ceiling``.

- the *step* deadline: how long a peer looks for its group and retries a broken round. Groups form
  within the matchmaking time of the first member's arrival, so a peer that found none after twice that
  plus a round has missed its group (it joined mid-epoch, or was cut off): it stops waiting and catches
  up. At most ``ceiling``.

- the *overlapped gather*: how long an overlapped round's member waits for the slowest member's
  commitment. That member commits once it has computed the epoch after the round's, and a member that
  runs ahead is held back only at its own next epoch's end (it needs the round's result then), so it can
  be up to a whole epoch ahead: the step deadline plus :data:`OVERLAP_EPOCHS` of its own last epoch's
  time (a slower member's epoch takes longer). The wait runs beside this member's compute, so it may pass
  the ceiling; a member that dies breaks the gather's connections at once, and a member that hangs is
  dropped by a newer group version.

- the *straggle* allowance: how long a member may still be finishing a round that the others have
  already finished (their results reach the members at slightly different times): the slowest recent
  round, at least half the floor (the floor before any round). A peer that sees the others past its
  epoch for longer than this has lost its round, and stops waiting for it.

``ceiling`` is the run spec's ``averaging.timeout_seconds``: the researcher's bound on a whole step.
Before any round is measured the deadlines are the widest: a third of the ceiling, and the ceiling.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Epochs of its own an overlapped round's member waits for the slowest one beyond the step deadline. Measured
# (bytes-lm, 4,096 samples a step, 4 peers on 2 cores): epochs of 15-30 s, and every round of the third
# epoch failed at the step deadline alone (6-8 s) while a member was still computing.
OVERLAP_EPOCHS = 1.5


@dataclass
class RoundDeadlines:
    ceiling: float
    floor: float
    factor: float = 2.0
    window: int = 20
    rounds: deque[float] = field(default_factory=deque)

    def observe(self, seconds: float) -> None:
        """Record how long a completed all-reduce took."""
        self.rounds.append(max(0.0, seconds))
        while len(self.rounds) > self.window:
            self.rounds.popleft()

    def chunk(self) -> float:
        top = self.ceiling / 3
        if not self.rounds:
            return max(self.floor, top)
        return max(self.floor, min(top, self.factor * max(self.rounds)))

    def round(self) -> float:
        return min(self.ceiling, 3 * self.chunk())

    def step(self, matchmaking: float) -> float:
        return min(self.ceiling, 2 * matchmaking + self.round())

    def overlapped(self, matchmaking: float, epoch_seconds: float) -> float:
        return self.step(matchmaking) + OVERLAP_EPOCHS * epoch_seconds

    def reveal(self, members: int) -> float:
        """A refused round's reveal (:meth:`peer.collective.FastPath.blame`): each member receives every
        other's update once, ``members - 1`` round payloads against a round's two."""
        return self.round() * max(1, members - 1)

    def straggle(self) -> float:
        if not self.rounds:  # a peer that just joined: its first round is as late as the others' next
            return self.floor
        return max(self.floor / 2, min(self.chunk(), max(self.rounds)))
