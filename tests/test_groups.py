"""The training group's decision (coordinator.groups.decide): every rule, with the reason it gives."""

from __future__ import annotations

from dataclasses import replace

from coordinator.groups import Candidate, Group, GroupConfig, answers_wait, decide

CONFIG = GroupConfig(regroup_seconds=0.5)
A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def short(account: str) -> str:
    return f"{account[:8]}..."


def peer(
    account: str,
    at: float = 0.0,
    *,
    matched_at: float | None = None,
    address: str | None = "default",
    version: int | None = None,
    failed: int | None = None,
    unreachable: frozenset[str] = frozenset(),
) -> Candidate:
    """A candidate that checked in at ``at``; matched in the order A, B, C, D unless told."""
    return Candidate(
        account=account,
        matched_at={A: 1.0, B: 2.0, C: 3.0, D: 4.0}[account] if matched_at is None else matched_at,
        address=f"10.0.0.{account[0]}:4000" if address == "default" else address,
        checked_in_at=at,
        version=version,
        failed_version=failed,
        unreachable=unreachable,
    )


def formed(*candidates: Candidate, at: float = 0.0) -> Group:
    group = decide(at, None, candidates, CONFIG)
    assert group is not None
    return group


# ------------------------------------------------------------------------------------- members and ranks


def test_no_candidates_no_group_and_a_group_without_candidates_is_kept() -> None:
    assert decide(5.0, None, [], CONFIG) is None
    group = formed(peer(A))
    assert decide(9.0, group, [], CONFIG) is group


def test_the_first_group_ranks_by_match_time_then_account() -> None:
    group = formed(peer(C), peer(A), peer(B, matched_at=1.0))
    assert (group.version, group.members, group.path) == (1, (A, B, C), "fast")
    assert group.reason == f"{short(A)}, {short(B)}, {short(C)} joined"
    assert group.addresses == ("10.0.0.a:4000", "10.0.0.b:4000", "10.0.0.c:4000")


def test_nothing_changed_gives_the_same_object_back() -> None:
    group = formed(peer(A), peer(B))
    # check-ins on the version, with nothing to say: no new version, no write
    later = [peer(A, 3.0, version=1), peer(B, 3.1, version=1)]
    assert decide(3.2, group, later, CONFIG) is group


def test_a_join_gives_a_new_version() -> None:
    v1 = formed(peer(A), peer(B))
    v2 = decide(2.0, v1, [peer(A, 1.0, version=1), peer(B, 1.0, version=1), peer(C, 2.0)], CONFIG)
    assert v2 is not None and (v2.version, v2.members, v2.path, v2.formed_at) == (2, (A, B, C), "fast", 2.0)
    assert v2.reason == f"{short(C)} joined"


def test_a_drop_ban_or_leave_gives_a_new_version_without_the_member() -> None:
    v1 = formed(peer(A), peer(B), peer(C))
    v2 = decide(4.0, v1, [peer(A, 1.0), peer(C, 1.0)], CONFIG)  # B is no longer a candidate
    assert v2 is not None and (v2.version, v2.members) == (2, (A, C))
    assert v2.reason == f"{short(B)} left"


def test_a_join_and_a_leave_together_are_one_version() -> None:
    v1 = formed(peer(A), peer(B))
    v2 = decide(3.0, v1, [peer(A, 1.0), peer(C, 3.0)], CONFIG)
    assert v2 is not None and (v2.version, v2.members) == (2, (A, C))
    assert v2.reason == f"{short(C)} joined; {short(B)} left"


def test_everyone_gone_keeps_the_group_until_someone_checks_in() -> None:
    v1 = formed(peer(A))
    assert decide(2.0, v1, [], CONFIG) is v1


def test_a_member_at_another_address_gives_a_new_version() -> None:
    v1 = formed(peer(A), peer(B))
    v2 = decide(2.0, v1, [peer(A, 2.0, address="10.9.9.9:5000"), peer(B, 1.0)], CONFIG)
    assert v2 is not None and v2.version == 2 and v2.address_of(A) == "10.9.9.9:5000"
    assert v2.reason == f"{short(A)} moved to 10.9.9.9:5000"


# ------------------------------------------------------------------------------------------------ failure


def test_a_failure_with_everyone_returning_regroups_at_once() -> None:
    v1 = formed(peer(A), peer(B), peer(C))
    # A reports that version 1 failed: it is marked, no new version while B and C have not checked in since
    marked = decide(5.0, v1, [peer(A, 5.0, version=1, failed=1), peer(B, 1.0), peer(C, 1.0)], CONFIG)
    assert marked is not None and marked.version == 1
    assert (marked.failed_at, marked.failed_by) == (5.0, A)
    # a check-in that changes nothing more gives the marked group back as it is
    same = [peer(A, 5.0, version=1, failed=1), peer(B, 5.1, version=1, failed=1), peer(C, 1.0)]
    assert decide(5.1, marked, same, CONFIG) is marked
    back = [peer(A, 5.0, version=1, failed=1), peer(B, 5.1, version=1, failed=1), peer(C, 5.2, version=1)]
    v2 = decide(5.2, marked, back, CONFIG)
    assert v2 is not None and (v2.version, v2.members, v2.failed_at) == (2, (A, B, C), None)
    assert v2.reason == f"version 1 failed (reported by {short(A)}); every member returned"
    assert v2.formed_at == 5.2  # before regroup_seconds: nobody waited for the deadline


def test_a_member_that_does_not_return_is_left_out_after_regroup_seconds() -> None:
    v1 = formed(peer(A), peer(B), peer(C))
    silent_c = peer(C, 1.0, version=1)  # died mid all-reduce: never checks in again
    marked = decide(5.0, v1, [peer(A, 5.0, version=1, failed=1), peer(B, 1.0), silent_c], CONFIG)
    assert marked is not None and marked.failed_at == 5.0
    waiting = [peer(A, 5.0, version=1, failed=1), peer(B, 5.2, version=1, failed=1), silent_c]
    assert decide(5.2, marked, waiting, CONFIG) is marked  # C may still come back
    polled = [peer(A, 5.5, version=1, failed=1), peer(B, 5.2, version=1, failed=1), silent_c]
    v2 = decide(5.5, marked, polled, CONFIG)
    assert v2 is not None and (v2.version, v2.members) == (2, (A, B))
    assert v2.reason == f"version 1 failed (reported by {short(A)}); {short(C)} did not return within 0.5 s"
    # C is still a candidate (its lease has not lapsed) but stays out until it checks in again ...
    assert decide(5.6, v2, [peer(A, 5.6, version=2), peer(B, 5.6, version=2), silent_c], CONFIG) is v2
    # ... when it joins again
    v3 = decide(7.0, v2, [peer(A, 5.6, version=2), peer(B, 5.6, version=2), peer(C, 7.0)], CONFIG)
    assert v3 is not None and (v3.version, v3.members) == (3, (A, B, C))
    assert v3.reason == f"{short(C)} joined"


def test_a_long_poll_for_the_next_version_is_answered_when_it_forms_or_the_failure_is_due() -> None:
    v1 = formed(peer(A), peer(B))
    assert not answers_wait(9.0, v1, 1, CONFIG)  # nothing failed: only a new version answers it
    assert answers_wait(9.0, v1, 0, CONFIG)  # the waiting peer is behind: answered at once
    marked = decide(5.0, v1, [peer(A, 5.0, version=1, failed=1), peer(B, 1.0)], CONFIG)
    assert marked is not None
    assert not answers_wait(5.4, marked, 1, CONFIG)  # B may still come back
    assert answers_wait(5.5, marked, 1, CONFIG)  # due: the waiting peer's next check-in regroups


def test_a_member_that_drops_during_the_wait_no_longer_holds_it_up() -> None:
    v1 = formed(peer(A), peer(B))
    marked = decide(5.0, v1, [peer(A, 5.0, version=1, failed=1), peer(B, 1.0)], CONFIG)
    v2 = decide(5.1, marked, [peer(A, 5.0, version=1, failed=1)], CONFIG)  # B's lease lapsed
    assert v2 is not None and (v2.version, v2.members) == (2, (A,))
    assert v2.reason == f"version 1 failed (reported by {short(A)}); {short(B)} left"


def test_a_peer_that_joined_during_the_wait_is_in_the_next_version() -> None:
    v1 = formed(peer(A), peer(B))
    marked = decide(5.0, v1, [peer(A, 5.0, version=1, failed=1), peer(B, 1.0)], CONFIG)
    joined = [peer(A, 5.0, version=1, failed=1), peer(B, 1.0), peer(C, 5.1)]
    assert decide(5.1, marked, joined, CONFIG) is marked  # still waiting for B
    v2 = decide(5.6, marked, [*joined[:2], peer(C, 5.6)], CONFIG)
    assert v2 is not None and v2.members == (A, C)
    assert v2.reason == (
        f"version 1 failed (reported by {short(A)}); {short(B)} did not return within 0.5 s; "
        f"{short(C)} joined"
    )


def test_failures_of_other_versions_and_from_non_members_are_ignored() -> None:
    v1 = formed(peer(A), peer(B))
    v2 = decide(2.0, v1, [peer(A, 1.0), peer(B, 1.0), peer(C, 2.0)], CONFIG)
    assert v2 is not None and v2.version == 2
    stale = [peer(A, 3.0, version=1, failed=1), peer(B, 3.0, version=2, failed=7), peer(C, 3.0, version=9)]
    assert decide(3.0, v2, stale, CONFIG) is v2
    v3 = decide(4.0, v2, [peer(A, 1.0), peer(B, 1.0)], CONFIG)  # C left
    assert v3 is not None
    assert decide(5.0, v3, [peer(A, 1.0), peer(B, 1.0), peer(C, 2.0, failed=3)], CONFIG) is v3


def test_nobody_back_after_the_deadline_keeps_the_failed_version() -> None:
    v1 = formed(peer(A), peer(B))
    marked = decide(5.0, v1, [peer(A, 5.0, version=1, failed=1), peer(B, 1.0)], CONFIG)
    assert marked is not None
    assert decide(9.0, marked, [], CONFIG) is marked


# --------------------------------------------------------------------------------------------------- path


def test_no_address_puts_the_group_on_hivemind() -> None:
    group = formed(peer(A), peer(B, address=None))
    assert group.path == "hivemind"
    assert group.reason == (
        f"{short(A)}, {short(B)} joined; "
        f"{short(B)} cannot be reached directly (no address): hivemind's averager"
    )


def test_an_unreachable_member_fails_the_version_and_one_that_returns_moves_it_to_hivemind() -> None:
    v1 = formed(peer(A), peer(B), peer(C))
    report = peer(A, 2.0, version=1, unreachable=frozenset({B}))
    marked = decide(2.0, v1, [report, peer(B, 1.0), peer(C, 1.0)], CONFIG)
    assert marked is not None and (marked.version, marked.failed_at, marked.failed_by) == (1, 2.0, A)
    assert marked.suspects == {(B, "10.0.0.b:4000")}
    # B is alive (it checks in again, at the same address) but A cannot connect to it: hivemind
    back = [report, peer(B, 2.1, version=1, failed=1), peer(C, 2.1, version=1, failed=1)]
    v2 = decide(2.1, marked, back, CONFIG)
    assert v2 is not None and (v2.version, v2.members, v2.path) == (2, (A, B, C), "hivemind")
    assert v2.reason == (
        f"version 1 failed (reported by {short(A)}); every member returned; "
        f"{short(B)} at 10.0.0.b:4000 could not be reached before: hivemind's averager"
    )
    # the report was against version 1: on version 2 it changes nothing
    assert decide(2.5, v2, [report, peer(B, 2.5, version=2), peer(C, 2.5, version=2)], CONFIG) is v2


def test_an_unreachable_member_that_died_is_left_out_and_the_rest_stay_fast() -> None:
    v1 = formed(peer(A), peer(B), peer(C))
    report = peer(A, 2.0, version=1, unreachable=frozenset({B}))
    marked = decide(2.0, v1, [report, peer(B, 1.0), peer(C, 1.0)], CONFIG)
    survivors = [report, peer(B, 1.0), peer(C, 2.1, version=1, failed=1)]
    assert decide(2.4, marked, survivors, CONFIG) is marked  # B may still come back
    v2 = decide(2.6, marked, survivors, CONFIG)
    assert v2 is not None and (v2.version, v2.members, v2.path) == (2, (A, C), "fast")
    assert v2.reason == (f"version 1 failed (reported by {short(A)}); {short(B)} did not return within 0.5 s")
    # its restarted trainer listens at a new address: tried on the fast path again
    v3 = decide(
        3.0, v2, [peer(A, 2.6, version=2), peer(B, 3.0, address="10.0.0.b:5000"), peer(C, 2.6)], CONFIG
    )
    assert v3 is not None and (v3.members, v3.path) == ((A, B, C), "fast")


def test_a_suspect_address_stays_off_the_fast_path_while_its_peer_is_a_candidate() -> None:
    v1 = formed(peer(A), peer(B))
    report = peer(A, 2.0, version=1, unreachable=frozenset({B}))
    marked = decide(2.0, v1, [report, peer(B, 1.0)], CONFIG)
    v2 = decide(2.1, marked, [report, peer(B, 2.1, version=1, failed=1)], CONFIG)
    assert v2 is not None and v2.path == "hivemind"
    v3 = decide(3.0, v2, [peer(A, 2.5, version=2), peer(B, 2.5, version=2), peer(C, 3.0)], CONFIG)
    assert v3 is not None and (v3.version, v3.members, v3.path) == (3, (A, B, C), "hivemind")
    assert v3.reason.startswith(f"{short(C)} joined; {short(B)} at 10.0.0.b:4000 could not be reached")
    # once B is gone, its address is forgotten and the group is fast again
    v4 = decide(4.0, v3, [peer(A, 3.5, version=3), peer(C, 3.5, version=3)], CONFIG)
    assert v4 is not None and (v4.members, v4.path, v4.suspects) == ((A, C), "fast", frozenset())
    # and a group on hivemind for want of an address is fast again once the peer without one leaves
    h1 = formed(peer(A), peer(B), peer(C, address=None))
    assert h1.path == "hivemind"
    h2 = decide(2.0, h1, [peer(A), peer(B)], CONFIG)
    assert h2 is not None and (h2.path, h2.reason) == ("fast", f"{short(C)} left")


def test_a_regroup_of_the_same_members_stays_on_hivemind() -> None:
    h1 = formed(peer(A), peer(B, address=None))
    assert h1.path == "hivemind"
    marked = decide(3.0, h1, [peer(A, 3.0, version=1, failed=1), peer(B, 1.0, address=None)], CONFIG)
    back = [peer(A, 3.0, version=1, failed=1), peer(B, 3.1, version=1, address=None)]
    h2 = decide(3.1, marked, back, CONFIG)
    assert h2 is not None and (h2.version, h2.path) == (2, "hivemind")
    moved = [peer(A, 3.0, version=1, failed=1), peer(B, 3.1, version=1, address="10.0.0.b:4000")]
    marked = decide(3.0, h1, [peer(A, 3.0, version=1, failed=1), peer(B, 1.0, address=None)], CONFIG)
    h2 = decide(3.1, marked, moved, CONFIG)
    assert h2 is not None and (h2.version, h2.path) == (2, "fast")


def test_a_failure_whose_members_report_an_unreachable_one_regroups_on_hivemind() -> None:
    v1 = formed(peer(A), peer(B))
    report = peer(A, 5.0, version=1, failed=1, unreachable=frozenset({B}))
    marked = decide(5.0, v1, [report, peer(B, 1.0)], CONFIG)
    assert marked is not None and marked.failed_at == 5.0 and marked.version == 1  # failure first
    v2 = decide(5.1, marked, [report, peer(B, 5.1, version=1, failed=1)], CONFIG)
    assert v2 is not None and (v2.members, v2.path) == ((A, B), "hivemind")
    assert v2.reason == (
        f"version 1 failed (reported by {short(A)}); every member returned; "
        f"{short(B)} at 10.0.0.b:4000 could not be reached before: hivemind's averager"
    )


def test_odd_unreachable_reports_are_ignored() -> None:
    v1 = formed(peer(A), peer(B))
    odd = frozenset({A, D, "not an account"})  # itself, a stranger, junk
    assert decide(2.0, v1, [peer(A, 2.0, version=1, unreachable=odd), peer(B, 1.0)], CONFIG) is v1
    future = peer(A, 2.0, version=5, unreachable=frozenset({B}))  # a version from the future
    assert decide(2.0, v1, [future, peer(B, 1.0)], CONFIG) is v1
    on_hivemind = formed(peer(A), peer(B, address=None))
    report = peer(A, 2.0, version=1, unreachable=frozenset({B}))
    assert decide(2.0, on_hivemind, [report, peer(B, 1.0, address=None)], CONFIG) is on_hivemind


def test_a_marked_failure_is_not_marked_twice() -> None:
    v1 = formed(peer(A), peer(B), peer(C))
    marked = decide(5.0, v1, [peer(A, 5.0, version=1, failed=1), peer(B, 1.0), peer(C, 1.0)], CONFIG)
    assert marked is not None
    again = replace(marked)  # as loaded from the store: equal, not the same object
    assert (
        decide(5.1, again, [peer(A, 5.0, version=1, failed=1), peer(B, 1.0), peer(C, 1.0)], CONFIG) is again
    )
