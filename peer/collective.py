"""The fast path of a run's averaging rounds: one torch.distributed (gloo) process group per group
version, decided by the coordinator and built through its authenticated rendezvous.

Why: hivemind's round (DHT matchmaking every step, a butterfly all-reduce over p2pd streams) measured
4.8-12.5x gloo's ``all_reduce`` of the same tensor on loopback. When every member of a run can reach
every other directly, the coordinator (which knows who is live) puts the run on this path
(:mod:`coordinator.groups`); the members then build a gloo group once per membership change, and each
epoch's round is two collectives on it, issued together (in fp32):

1. an all-gather of each member's signed *commitment*: its epoch, its weight (samples), a sketch of the
   update it is about to send and a sketch of its parameters. Members at different epochs find out here;
   a signature that does not verify ends the round for everyone alike (the sum is then dropped);
2. an all-reduce (sum) of each member's update scaled by its own weight; the sum is divided by the
   gathered total weight on the way out (in fp16 each part is scaled to its share before it is halved,
   after the gather, so that the sum cannot overflow).

Before anyone applies the result, each member checks it against the commitments: sketches are linear,
so the sketch of the weighted mean must equal the weighted mean of the committed sketches, within float
rounding. A member that sends something other than what it committed to (noise added after committing,
say) makes the check fail on every member, and no one applies the round. Every member sees the same
gathered commitments and the same sum, so all members reach the same verdict. The sketches use the
epoch's gradient seed, the one the members' reports use, and every member's report carries the round's
gathered commitments: the coordinator then checks each member's committed update against the
micro-batches its own report commits to (:mod:`peer.protocol.commitment`), which catches a member that
sends, and commits to, an update other than the one its audited work adds up to.

Every collective has a deadline (:class:`peer.deadlines.RoundDeadlines`, from measured rounds); a member
that dies mid-round closes its sockets and the others' collective fails within a fraction of a second
(measured: 0.11-0.14 s for 4 x 100 MB on loopback). A failed round is applied by no one; the survivors
ask the coordinator for the next version and train on it.

Reachability is checked, not assumed: each peer runs a :class:`ReachListener` at the address it
advertises, and before a group is used each member connects to every other member's; one that cannot
reports it, and the coordinator regroups without that member or, should it come back (alive but not
reachable), puts the run on hivemind's averager.

torch.distributed authenticates nothing (torch's SECURITY.md: trusted networks only). What a host
outside the run can do against this path, and why it is bounded: it cannot join a group (the rendezvous
is members-only, :mod:`peer.rendezvous`); gloo's listening ports are new for every version; what it
sends to them is dropped by gloo or breaks a connection, which fails that round for all (no one applies
it) within the deadline; and a result it managed to change would fail the commitment check. Nothing on
this path unpickles anything.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from hivemind.utils import get_logger

from peer.deadlines import RoundDeadlines
from peer.protocol.commitment import COMMITMENT_BYTES, NO_CLAIM, TAMPER_TOLERANCE, Commitment, matches
from peer.protocol.identity import Identity
from peer.protocol.run_schemas import CheckinBody, GroupMemberView, GroupView
from peer.protocol.sketch import relative_distance
from peer.rendezvous import LONG_POLL_MS, CoordinatorStore
from peer.sketch import EpochSketchers

logger = get_logger(__name__)

REVEAL_TAG = 7  # the point-to-point messages of a refused round's reveal (FastPath.blame)
POLL_SECONDS = 0.05  # how often a waiting collective looks whether a newer group version formed
REACH_RECHECK_SECONDS = 0.5  # how often a late group build checks that the others still answer


class RoundFailed(RuntimeError):
    """A collective of the round failed or ran out of time: no member applies the round."""


class BuildStopped(RuntimeError):
    """A version's process group was given up on before it was made: out of time, ``replaced`` by a
    newer version, or because members in ``unreachable`` stopped answering at their addresses."""

    def __init__(self, message: str, *, replaced: bool = False, unreachable: Sequence[str] = ()):
        super().__init__(message)
        self.replaced = replaced
        self.unreachable = list(unreachable)


@dataclass(frozen=True)
class FastRound:
    """What a round on the fast path gave.

    - ``averaged``: the buffers hold the members' weighted mean, checked against their commitments;
    - ``out_of_step``: the members were not all at this epoch (``epochs`` says where each was); nothing
      was summed;
    - ``rejected``: a commitment did not verify, or the result did not match the commitments (``reason``
      says which); nothing is applied, by any member;
    - ``failed``: a collective broke or ran out of time; nothing is applied.
    """

    outcome: Literal["averaged", "out_of_step", "rejected", "failed"]
    reason: str = ""
    gathered: dict[str, Any] = field(default_factory=dict)  # account -> {"account", "params", "commitment"}
    epochs: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # the all-reduce itself
    mismatch: bool = False  # rejected because the result did not match the commitments
    blamed: list[str] = field(default_factory=list)  # members that revealed other than they committed to


def verdict(
    commitments: Sequence[Commitment], members: Sequence[str], run_id: str, version: int, epoch: int
) -> tuple[str, str]:
    """Whether the gathered commitments allow the round to go on: ``("ok", "")``, ``("out_of_step",
    why)`` or ``("rejected", why)``. Pure; every member runs it on the same bytes and so agrees."""
    for rank, (c, account) in enumerate(zip(commitments, members, strict=True)):
        who = f"rank {rank} ({account[:12]}...)"
        if c.version != version or c.rank != rank:
            return "rejected", f"{who} committed to version {c.version} rank {c.rank}"
        if not c.verifies(run_id, account):
            return "rejected", f"{who}'s commitment is not signed by its account"
        if not (math.isfinite(c.weight) and c.weight > 0):
            return "rejected", f"{who} committed to weight {c.weight!r}"
    epochs = {c.epoch for c in commitments}
    if len(epochs) > 1:
        return "out_of_step", f"members at epochs {sorted(epochs)} (this peer at {epoch})"
    return "ok", ""


class ReachListener:
    """A TCP listener that answers every connection with this peer's account id and closes it: the
    address a peer advertises for the fast path, which the other members connect to before a group is
    used. It reads nothing from whoever connects."""

    def __init__(self, host: str, account: str):
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(0.5)
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._answer = account.encode()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="reach-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:  # the accept timeout, or the socket closed
                continue
            with conn:
                try:
                    conn.settimeout(0.5)
                    conn.sendall(self._answer)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=2)


def _aborted(pg: dist.ProcessGroup, pending: dist.Work | None) -> bool:
    """Abort ``pg`` unless its ``pending`` collective is still running; whether it was aborted."""
    if pending is not None and not pending.is_completed():
        return False
    try:
        pg.abort()
    except Exception as e:
        logger.debug(f"Aborting a process group: {e!r}")
    return True


def _finished(work: dist.Work, ends: float) -> bool:
    """Whether ``work`` (a point-to-point send or receive: gloo gives those no future, and they complete
    only inside ``wait``) completed without error by the monotonic time ``ends``."""
    try:
        work.wait(datetime.timedelta(seconds=max(0.001, ends - time.monotonic())))
    except Exception as e:  # out of time, or a connection that broke: nothing came
        logger.debug(f"A revealed update did not arrive: {e!r}")
        return False
    return True


def reaches(address: str, account: str, timeout: float, attempts: int = 3) -> bool:
    """Whether ``address`` accepts a connection within ``timeout`` seconds and answers as ``account``, in
    one of ``attempts`` tries: one slow answer (a busy peer's listener thread waits for the GIL) must not
    move a whole run to hivemind's path."""
    return any(_answers(address, account, timeout) for _ in range(attempts))


def _answers(address: str, account: str, timeout: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.settimeout(timeout)
            answer = b""
            while len(answer) < len(account):
                chunk = conn.recv(len(account) - len(answer))
                if not chunk:
                    break
                answer += chunk
            return answer == account.encode()
    except (OSError, ValueError):
        return False


class FastPath:
    """One trainer's side of its run's fast path: the reach listener, check-ins with the coordinator
    and the process group of the current group version.

    ``call`` runs a coroutine of ``client`` on the run link's loop and returns its result.
    """

    def __init__(
        self,
        *,
        run_id: str,
        identity: Identity,
        client: Any,
        call: Callable[..., Any],
        host: str,
        n_params: int,
        precision: Literal["fp32", "fp16"],
        deadlines: RoundDeadlines,
        reach_timeout: float,
        regroup_timeout: float,
    ):
        self.run_id = run_id
        self.identity = identity
        self._client = client
        self._call = call
        self.listener = ReachListener(host, identity.account)
        self.host = host
        self.precision = precision
        self.deadlines = deadlines
        self.reach_timeout = reach_timeout
        self.regroup_timeout = regroup_timeout
        self.flat = torch.zeros(n_params)
        # the epochs' gradient sketchers: the seed the members' reports use, so that the coordinator can
        # check a commitment against the committing member's report
        self._sketchers = EpochSketchers(n_params, run_id)
        self.group: GroupView | None = None  # the version the process group below belongs to
        self.pg: dist.ProcessGroup | None = None
        self._retired: list[tuple[dist.ProcessGroup, dist.Work | None]] = []  # see discard()
        self.rank = -1
        self.weight = 1.0  # this member's, in the round load() put in the flat tensor
        self.divisor = 1.0  # what the flat tensor is divided by to be the mean: see reduce()
        self.tamper: Callable[[torch.Tensor], None] = lambda flat: None  # peer.adversary's noisy-round

    # ------------------------------------------------------------------------------- membership

    def checkin(
        self,
        *,
        version: int | None = None,
        failed_version: int | None = None,
        unreachable: Sequence[str] = (),
        wait_ms: int = 0,
    ) -> GroupView:
        body = CheckinBody(
            address=self.listener.address,
            version=version,
            failed_version=failed_version,
            unreachable=list(unreachable),
            wait_ms=wait_ms,
        )
        return self._call(lambda: self._client.group_checkin(self.run_id, body))

    def usable(self, group: GroupView | None) -> bool:
        """Whether ``group`` puts this peer on the fast path (it is a member of a version on it)."""
        return (
            group is not None
            and group.path == "fast"
            and any(m.account == self.identity.account for m in group.members)
        )

    def ready(self, group: GroupView, newer: Callable[[], bool] = lambda: False) -> bool:
        """Make the process group of ``group`` (a version this peer is a member of, on the fast path)
        if it is not already made: check that every other member answers at its address, then
        rendezvous. False when a member could not be reached (reported: the coordinator fails the
        version, and regroups without it or, if it comes back, on hivemind's path) or the rendezvous
        failed (reported as a failed version). ``newer`` ends the wait for the others, as in a round."""
        if self.group is not None and self.group.version == group.version and self.pg is not None:
            return True
        self.discard()
        missing = self._unreachable([m for m in group.members if m.account != self.identity.account])
        if missing:
            logger.warning(f"Group version {group.version}: cannot reach {[a[:12] for a in missing]}")
            self._report(version=group.version, unreachable=missing)
            return False
        store = CoordinatorStore(self._client, self._call, self.run_id, group.version, self.deadlines.ceiling)
        try:
            self.build(group, store, newer)
        except BuildStopped as e:
            logger.warning(f"Group version {group.version} was not built: {e}")
            if e.unreachable:
                self._report(version=group.version, unreachable=e.unreachable)
            elif not e.replaced:
                self._report(failed_version=group.version)
            return False
        except Exception as e:  # a member that did not come, or the coordinator's refusal (stale version)
            logger.warning(f"Group version {group.version} was not built: {e!r}"[:400])
            self._report(failed_version=group.version)
            return False
        return True

    def _unreachable(self, others: Sequence[GroupMemberView]) -> list[str]:
        """The accounts among ``others`` that do not answer at their addresses as themselves."""
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(others)))) as pool:
            answers = list(
                pool.map(
                    lambda m: m.address is not None and reaches(m.address, m.account, self.reach_timeout),
                    others,
                )
            )
        return [m.account for m, ok in zip(others, answers, strict=True) if not ok]

    def build(self, group: GroupView, store: dist.Store, newer: Callable[[], bool] = lambda: False) -> None:
        """Rendezvous through ``store`` and make the gloo process group of ``group``, bound to this
        peer's direct address (a new listening port for every version).

        gloo's constructor blocks until every member has connected, and its connects retry for as long as
        it likes (measured: 75 s against a member killed while the version formed, with a 15 s timeout
        set), so it runs on a thread of its own and this waits for it by the round's rules: at most the
        deadline ceiling, ended by ``newer``, and, once the others are late (``straggle``), ended as
        soon as a member no longer answers at its address (it died: :class:`BuildStopped` names it). A
        build given up on has its store's waits ended and its group, should it still come, aborted."""
        rank = next(m.rank for m in group.members if m.account == self.identity.account)
        started = time.monotonic()
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
        options._timeout = datetime.timedelta(seconds=self.deadlines.ceiling)
        lock, made, given_up = threading.Lock(), {}, threading.Event()

        def make() -> None:
            try:
                pg = dist.ProcessGroupGloo(store, rank, len(group.members), options)
            except Exception as e:
                made["error"] = e
                return
            with lock:
                if not given_up.is_set():
                    made["pg"] = pg
                    return
            _aborted(pg, None)

        thread = threading.Thread(target=make, name=f"gloo-build-v{group.version}", daemon=True)
        thread.start()
        ends, straggle = started + self.deadlines.ceiling, started + self.deadlines.straggle()
        checked = started
        known = [m for m in group.members if m.account != self.identity.account and m.address is not None]
        while True:
            thread.join(POLL_SECONDS)
            if not thread.is_alive():
                break
            now = time.monotonic()
            stop: BuildStopped | None = None
            if now > ends:
                stop = BuildStopped(f"not made within {self.deadlines.ceiling:.2f} s")
            elif newer():
                stop = BuildStopped("a newer version formed while it was made", replaced=True)
            elif now > straggle and now - checked >= REACH_RECHECK_SECONDS:
                checked = now
                gone = self._unreachable(known)
                if gone:
                    stop = BuildStopped(f"{[a[:12] for a in gone]} stopped answering", unreachable=gone)
            if stop is not None:
                with lock:
                    given_up.set()
                    pg = made.pop("pg", None)
                if pg is not None:  # it came just now: a group given up on is not used
                    _aborted(pg, None)
                store.set_timeout(datetime.timedelta(0))
                raise stop
        if "error" in made:
            raise made["error"]
        self.pg = made["pg"]
        self.group, self.rank = group, rank
        logger.info(
            f"Fast path: group version {group.version}, rank {rank} of {len(group.members)}, "
            f"built in {time.monotonic() - started:.3f} s"
        )

    def _report(self, **kwargs: Any) -> None:
        try:
            self.checkin(**kwargs)
        except Exception as e:  # the coordinator decides without it (regroup_seconds)
            logger.warning(f"Could not tell the coordinator ({kwargs}): {e!r}")

    def regroup(self, version: int, *, failed: bool = True) -> GroupView | None:
        """Wait (at most ``regroup_timeout``) for the version after ``version``, reporting that one failed
        (it broke, or could not be made) unless not ``failed`` (it is fine, but not enough: this peer
        alone while others are coming); None if none came in time (the caller redoes the epoch and
        looks again)."""
        self.discard()
        ends = time.monotonic() + self.regroup_timeout
        while (left := ends - time.monotonic()) > 0:
            try:  # a long poll: the coordinator answers as soon as the next version forms
                group = self.checkin(
                    version=version,
                    failed_version=version if failed else None,
                    wait_ms=int(min(LONG_POLL_MS, left * 1000)),
                )
            except Exception as e:
                logger.warning(f"Check-in after version {version} failed: {e!r}")
                time.sleep(POLL_SECONDS)
                continue
            if group.version > version:
                return group
        return None

    def discard(self, pending: dist.Work | None = None) -> None:
        """Drop the current process group (its sockets close; anything waiting on it fails).

        A group with a collective still ``pending`` (given up on while live members have not answered)
        is not aborted yet: gloo's abort then blocks, holding the interpreter, until that collective's
        own timeout (measured: 14 s at a run's end, where two members stopped for the run's settling
        while two waited in the last round). It is kept aside and aborted once that collective ended."""
        self._retired = [(pg, work) for pg, work in self._retired if not _aborted(pg, work)]
        if self.pg is not None and not _aborted(self.pg, pending):
            self._retired.append((self.pg, pending))
        self.pg, self.group, self.rank = None, None, -1

    def close(self) -> None:
        self.discard()
        self.listener.close()

    # ------------------------------------------------------------------------------- one round

    def average(self, buffers: Sequence[torch.Tensor], *, weight: float, **round_args: Any) -> FastRound:
        """One round on the ready group (``round_args``: :meth:`reduce`'s): commitments, the all-reduce,
        the check; ``buffers`` hold the members' weighted mean only when the outcome is ``averaged``.
        The synchronous form of :meth:`load`, :meth:`reduce` and :meth:`unload`, which an overlapped
        round runs apart."""
        self.load(buffers, weight)
        result = self.reduce(**round_args)
        if result.outcome == "averaged":
            self.unload(buffers)
        elif result.mismatch:
            result = self.blame(buffers, weight, result)
        return result

    def blame(self, buffers: Sequence[torch.Tensor], weight: float, rejected: FastRound) -> FastRound:
        """After a round whose result did not match the commitments, find who lied: every member sends the
        update it put in (weight-scaled) to every other, point to point, and checks each one it receives
        against its sender's commitment. A member whose update does not come within the deadline is
        blamed too: one that will not show what it sent cannot be told from one that lied (so is an honest
        member too slow for the deadline). Honest members that a liar sent the same bytes blame alike
        (``blamed``); the trainer sends that to the coordinator (:func:`coordinator.round_store.blame`),
        which fails the member's epoch once most of the round's other members, and two at least, blame
        it. Nothing is applied. Not found this way (the round is still refused): a member that reveals
        what it committed to after sending something else, or different bytes to different members. It takes
        ``buffers`` as :meth:`average` left them (the synchronous round's, unchanged); it costs each
        member the round's bytes once per other member, and only after a refused round."""
        assert self.pg is not None and self.group is not None
        members = [m.account for m in self.group.members]
        commitments = [Commitment.decode(bytes.fromhex(rejected.gathered[a]["commitment"])) for a in members]
        self.load(buffers, weight)
        self.tamper(self.flat)  # a liar's reveal: what it sends
        others = [r for r in range(len(members)) if r != self.rank]
        revealed = {r: torch.empty_like(self.flat) for r in others}
        sends = [self.pg.send([self.flat], r, REVEAL_TAG) for r in others]
        receives = {r: self.pg.recv([revealed[r]], r, REVEAL_TAG) for r in others}
        ends = time.monotonic() + self.deadlines.reveal(len(members))
        sketcher = self._sketchers(commitments[0].epoch)
        blamed, late = [], None
        for r in others:
            if not _finished(receives[r], ends):
                blamed.append(members[r])
                late = receives[r]
                continue
            c = commitments[r]
            sketch = [x / c.weight for x in sketcher([revealed[r]])]
            if relative_distance(sketch, list(c.update)) > TAMPER_TOLERANCE["fp32"]:
                blamed.append(members[r])
        if late is not None or not all(_finished(w, ends) for w in sends):
            self.discard(pending=late)  # a member that did not answer leaves this group unusable
        found = (
            ", ".join(f"{a[:12]}..." for a in blamed) or "nobody (every member revealed what it committed to)"
        )
        reason = f"{rejected.reason}; revealed other than committed, or nothing: {found}"
        return dataclasses.replace(rejected, reason=reason, blamed=blamed)

    def views(self, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """The round's flat tensor as views shaped like ``shapes`` (the mean, once :meth:`reduce` averaged
        with ``mean``; valid until the next :meth:`load`)."""
        views, offset = [], 0
        for shape in shapes:
            n = math.prod(shape)
            views.append(self.flat[offset : offset + n].view(shape))
            offset += n
        return views

    def load(self, buffers: Sequence[torch.Tensor], weight: float) -> None:
        """Copy ``buffers`` (this member's update) times its ``weight`` (samples) into the round's flat
        tensor, which :meth:`reduce` sums in place; the caller may change ``buffers`` as soon as this
        returns. Scaling by its own weight, which each member knows before the round, rather than by its
        share of the total, known only once the commitments are gathered, lets the all-reduce start
        without waiting for the gather (the division by the total is folded into :meth:`unload`)."""
        self.weight = float(weight)
        for view, b in zip(self.views([b.shape for b in buffers]), buffers, strict=True):
            torch.mul(b, self.weight, out=view)

    def unload(self, buffers: Sequence[torch.Tensor]) -> None:
        """Write the round's result (after :meth:`reduce` averaged) into ``buffers``: the weighted mean."""
        for b, view in zip(buffers, self.views([b.shape for b in buffers]), strict=True):
            torch.div(view, self.divisor, out=b)

    def reduce(
        self,
        *,
        epoch: int,
        param_sketch: Sequence[float],
        wait_deadline: float,
        newer: Callable[[], bool] = lambda: False,
        mean: bool = False,
        claim: bytes = NO_CLAIM,
    ) -> FastRound:
        """The round of what :meth:`load` put in: when the outcome is ``averaged`` the flat tensor holds
        the members' weighted sum (``divisor`` is their total weight: :meth:`unload` divides), or with
        ``mean`` their weighted mean (for :meth:`views`). ``wait_deadline`` bounds the commitments'
        gather (where members wait for the slowest one's compute); the all-reduce has the measured
        round deadline. ``newer()`` (asked a few times a second while waiting) says whether a newer
        group version formed, which ends the wait at once. It may run in a thread of its own (an
        overlapped round) while the caller computes the next epoch, as long as nothing else uses this
        object until it returns.

        In fp32 the all-reduce is issued right behind the gather, so the two travel together: a round
        whose commitments do not allow it (members out of step, a bad signature) still sums, and its sum
        is dropped. In fp16 each member's part must be scaled to its share before it is halved (a
        weighted sum could overflow fp16), so the all-reduce waits for the gather."""
        assert self.pg is not None and self.group is not None
        group, members = self.group, [m.account for m in self.group.members]
        sketcher = self._sketchers(epoch)
        mine = Commitment(
            group.version,
            epoch,
            self.rank,
            self.weight,
            tuple(x / self.weight for x in sketcher([self.flat])),
            tuple(float(x) for x in param_sketch),
            claim,
        ).signed(self.run_id, self.identity)
        sent = torch.frombuffer(bytearray(mine.encode()), dtype=torch.uint8)
        received = [torch.empty(COMMITMENT_BYTES, dtype=torch.uint8) for _ in members]
        self.divisor = 1.0
        try:
            gathering = self.pg.allgather([received], [sent])
            summing = None
            if self.precision == "fp32":
                self.tamper(self.flat)
                summing = self.pg.allreduce([self.flat])
            self._wait(gathering, wait_deadline, newer, pending=summing)
        except RoundFailed as e:
            return FastRound("failed", str(e))
        commitments = [Commitment.decode(bytes(t.numpy())) for t in received]
        outcome, why = verdict(commitments, members, self.run_id, group.version, epoch)
        pairs = list(zip(members, commitments, strict=True))
        epochs = {a: c.epoch for a, c in pairs}
        gathered = {
            a: {"account": a, "params": list(c.params), "commitment": c.encode().hex()} for a, c in pairs
        }
        total = sum(c.weight for c in commitments)
        started = time.monotonic()
        try:
            if outcome != "ok":  # the sum in flight is dropped, once it ended (the next round reuses flat)
                if summing is not None:
                    self._wait(summing, self.deadlines.round(), newer)
                return FastRound(outcome, why, gathered, epochs)  # type: ignore[arg-type]
            if summing is None:
                self.tamper(self.flat)
                half = self.flat.mul_(1 / total).clamp_(-65504, 65504).half()
                self._wait(self.pg.allreduce([half]), self.deadlines.round(), newer)
                self.flat.copy_(half)
            else:
                self._wait(summing, self.deadlines.round(), newer)
                self.divisor = total
        except RoundFailed as e:
            return FastRound("failed", str(e), gathered, epochs)
        seconds = time.monotonic() - started
        self.deadlines.observe(seconds)
        if mean and self.divisor != 1.0:
            self.flat.div_(self.divisor)
            self.divisor = 1.0
        result = [x / self.divisor for x in sketcher([self.flat])]
        ok, why = matches(result, commitments, self.precision)
        if not ok:
            return FastRound("rejected", why, gathered, epochs, seconds, mismatch=True)
        return FastRound("averaged", "", gathered, epochs, seconds)

    def _wait(
        self, work: dist.Work, deadline: float, newer: Callable[[], bool], pending: dist.Work | None = None
    ) -> None:
        """Wait for ``work`` at most ``deadline`` seconds; a newer group version ends the wait too. On
        any failure the group is discarded (its other members' collectives then fail as well); given up
        on, it is aborted once ``pending`` (a collective issued after ``work``, else ``work``) ended."""
        last = pending if pending is not None else work
        done = threading.Event()
        future = work.get_future()
        future.add_done_callback(lambda _: done.set())
        ends = time.monotonic() + deadline
        version = self.group.version if self.group else None
        while not done.wait(POLL_SECONDS):
            if time.monotonic() > ends:
                self.discard(pending=last)
                raise RoundFailed(f"group version {version}: no answer within {deadline:.2f} s")
            if newer():
                self.discard(pending=last)
                raise RoundFailed(f"group version {version} was replaced while this round waited")
        try:
            work.wait()
        except Exception as e:  # gloo's error for a member that died or a connection that broke
            self.discard(pending=pending)
            raise RoundFailed(f"group version {version}: {e}"[:300]) from None
