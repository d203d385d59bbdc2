"""Who all-reduces with whom in a run: the group's members, ranks, version and path. A pure function.

The coordinator already knows who is live, so it decides the training group once per change instead of the
peers matching up every step (the style of torchft's ``quorum_compute``). :func:`decide` takes the time, the
run's current group and its candidates (active, joined matches that have checked in, with what they said in
their last check-in) and returns the group to use: the current one, the very same object, when nothing
changed (so that the store writes nothing), or a new version with the reason it exists.

- **Members** of a new version are ranked by (matched_at, account): rank 0 is the longest-matched peer.
- **Changes.** A candidate that checked in after the current version formed and is not in it joins; a member
  that is no longer a candidate (dropped, banned, left) leaves; a member that checks in from another address
  moved. Each gives a new version at once.
- **Failure.** A member that reports ``failed_version`` equal to the current version (its collective failed)
  marks the version failed (``failed_at``, ``failed_by``; no new version yet). The next version forms once
  every member still a candidate has checked in at or after ``failed_at`` (they all came back), or once
  ``regroup_seconds`` have passed since; its members are the candidates that checked in since the failure
  (a candidate that joined meanwhile among them), so a member that died mid all-reduce is left out. It
  comes back as a joiner when it checks in again.
- **Unreachable.** A member that reports it cannot reach another member of the current fast version
  fails the version as a broken collective does: the member it cannot reach may have died just then (a
  peer killed while a new version forms), and then the regroup leaves it out and the next version stays on
  the fast path. Its address becomes a *suspect* of the run's group.
- **Path.** A version is on the ``fast`` path (torch.distributed) when every member has an address and no
  member is at a suspect address (one it could not be reached at before, while it is still a candidate;
  a restarted peer listens at a new one); else on ``hivemind`` (its averager works through NAT and
  relays). So an unreachable member that comes back (it is alive, but others cannot connect to it)
  moves the group to hivemind. A version with the same members and addresses as a hivemind version stays
  on hivemind; any other change tries fast again.
- Inputs that do not fit (a report about a version other than the current one, an unreachable account that
  is not a member, a peer reporting itself) are ignored.

The decision runs when a peer checks in and when a match ends; a failed version whose deadline passed is
settled by the next check-in of a survivor (a survivor waiting in a long poll is answered once it is due,
and checks in again at once) or by the coordinator's sweep.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

Path = Literal["fast", "hivemind"]


@dataclass(frozen=True)
class Candidate:
    """An active, joined match of the run that has checked in, with its last check-in."""

    account: str
    matched_at: float
    address: str | None  # "host:port" of its fast-path listener; None: not reachable directly
    checked_in_at: float
    version: int | None  # the group version it is on
    failed_version: int | None  # a version whose collective failed for it
    unreachable: frozenset[str]  # members of ``version`` it could not connect to


@dataclass(frozen=True)
class Group:
    """One version of a run's group: ``members`` in rank order, ``addresses`` beside them."""

    version: int
    members: tuple[str, ...]
    path: Path
    reason: str
    formed_at: float
    failed_at: float | None = None
    failed_by: str | None = None
    addresses: tuple[str | None, ...] = ()
    # (account, address) pairs a member was reported unreachable at, kept while the account is a candidate
    suspects: frozenset[tuple[str, str]] = frozenset()

    def address_of(self, account: str) -> str | None:
        return dict(zip(self.members, self.addresses, strict=False)).get(account)


@dataclass(frozen=True)
class GroupConfig:
    """Coordinator-wide settings of the decision (``HIVEMARKET_GROUP_REGROUP_SECONDS``)."""

    regroup_seconds: float = 0.5


def answers_wait(now: float, group: Group, version: int, config: GroupConfig) -> bool:
    """Whether a check-in waiting for the version after ``version`` (a long poll) is answered now: a newer
    version formed, or ``group`` failed ``regroup_seconds`` ago or more. The regroup that is due then
    forms at the next check-in (the waiting peer's, which follows at once), not while a read waits."""
    if group.version > version:
        return True
    return group.failed_at is not None and now - group.failed_at >= config.regroup_seconds


def decide(
    now: float, current: Group | None, candidates: Sequence[Candidate], config: GroupConfig
) -> Group | None:
    """The run's group at ``now``: ``current`` itself when nothing changed, else a new version (or the
    current one marked failed). None only while no candidate ever checked in (``current`` is None and there
    are no candidates); a group whose candidates are all gone is kept as it is until one checks in."""
    ranked = sorted(candidates, key=lambda c: (c.matched_at, c.account))
    if current is None:
        if not ranked:
            return None
        return _form(1, now, ranked, f"{_names(c.account for c in ranked)} joined", None)
    by_account = {c.account: c for c in ranked}
    members = set(current.members)

    in_it = [c for c in ranked if c.account in members]
    unreachable = _unreachable(current, in_it) if current.path == "fast" else {}
    suspects = current.suspects | {(whom, at) for whom, (_, at) in unreachable.items() if at is not None}
    failed_at, failed_by = current.failed_at, current.failed_by
    if failed_at is None:
        reporters = [c for c in in_it if c.failed_version == current.version]
        reporters += [who for who, _ in unreachable.values()]
        if reporters:
            first = min(reporters, key=lambda c: (c.checked_in_at, c.matched_at, c.account))
            failed_at, failed_by = first.checked_in_at, first.account
    suspects = frozenset(pair for pair in suspects if pair[0] in by_account)  # kept while a candidate
    if failed_at is not None:
        return _after_failure(now, current, ranked, (failed_at, failed_by or ""), suspects, config)

    joined = [c for c in ranked if c.account not in members and c.checked_in_at >= current.formed_at]
    left = [m for m in current.members if m not in by_account]
    moved = [c for c in ranked if c.account in members and c.address != current.address_of(c.account)]
    staying = [c for c in ranked if c.account in members or c.checked_in_at >= current.formed_at]
    if not (joined or left or moved) or not staying:
        return current  # a group whose members all left is kept until a candidate checks in again
    why = []
    if joined:
        why.append(f"{_names(c.account for c in joined)} joined")
    if left:
        why.append(f"{_names(left)} left")
    why += [f"{_short(c.account)} moved to {c.address or 'no direct address'}" for c in moved]
    return _form(current.version + 1, now, staying, "; ".join(why), current, suspects)


def _after_failure(
    now: float,
    current: Group,
    ranked: list[Candidate],
    failure: tuple[float, str],
    suspects: frozenset[tuple[str, str]],
    config: GroupConfig,
) -> Group:
    """The current version failed at ``failed_at`` (reported by ``failed_by``): wait for its members to
    come back, then regroup."""
    failed_at, failed_by = failure
    returned = [c for c in ranked if c.checked_in_at >= failed_at]
    live = {c.account: c for c in ranked}
    waiting = [m for m in current.members if m in live and live[m].checked_in_at < failed_at]
    due = now - failed_at >= config.regroup_seconds
    if returned and (not waiting or due):
        why = f"version {current.version} failed (reported by {_short(failed_by)})"
        if waiting:
            why += f"; {_names(waiting)} did not return within {config.regroup_seconds:g} s"
        gone = [m for m in current.members if m not in live]
        if gone:
            why += f"; {_names(gone)} left"
        joined = [c.account for c in returned if c.account not in current.members]
        if joined:
            why += f"; {_names(joined)} joined"
        if not (waiting or gone or joined):
            why += "; every member returned"
        return _form(current.version + 1, now, returned, why, current, suspects)
    if (current.failed_at, current.failed_by, current.suspects) == (failed_at, failed_by, suspects):
        return current
    return replace(current, failed_at=failed_at, failed_by=failed_by, suspects=suspects)


def _form(
    version: int,
    now: float,
    members: list[Candidate],
    why: str,
    previous: Group | None,
    suspects: frozenset[tuple[str, str]] = frozenset(),
) -> Group:
    """A new version of ``members`` (in rank order) with its path and the reason for both."""
    accounts = tuple(c.account for c in members)
    addresses = tuple(c.address for c in members)
    path: Path = "fast"
    no_address = [c.account for c in members if c.address is None]
    suspect = [c for c in members if (c.account, c.address) in suspects]
    if suspect:
        where = ", ".join(f"{_short(c.account)} at {c.address}" for c in suspect)
        path_why = f"{where} could not be reached before: hivemind's averager"
        path = "hivemind"
    elif no_address:
        path_why = f"{_names(no_address)} cannot be reached directly (no address): hivemind's averager"
        path = "hivemind"
    elif (
        previous is not None
        and previous.path == "hivemind"
        and previous.members == accounts
        and previous.addresses == addresses
    ):
        path_why = f"the same members as version {previous.version}: hivemind's averager"
        path = "hivemind"
    else:
        path_why = ""
    reason = "; ".join(part for part in (why, path_why) if part)
    return Group(version, accounts, path, reason, now, addresses=addresses, suspects=suspects)


def _unreachable(version: Group, members: Sequence[Candidate]) -> dict[str, tuple[Candidate, str | None]]:
    """The members of ``version`` that another of its ``members`` reported, against that version, it could
    not reach: each with the first such reporter and the address it was tried at."""
    accounts = {c.account for c in members}
    found: dict[str, tuple[Candidate, str | None]] = {}
    for c in members:
        if c.version != version.version:
            continue
        for other in sorted(c.unreachable):
            if other in accounts and other != c.account and other not in found:
                found[other] = (c, version.address_of(other))
    return found


def _short(account: str) -> str:
    return f"{account[:8]}..."


def _names(accounts: Iterable[str]) -> str:
    return ", ".join(_short(a) for a in accounts)
