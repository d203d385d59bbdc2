"""Double-entry ledger: every movement of money is an entry that debits one book and credits another.

Books are named ``external`` (where deposits come from), ``balance:<account>``, ``escrow:<run>``,
``held:<run>`` (reports' pay waiting for their audits), ``earned:<account>``, ``withdrawn:<account>`` (paid
out of the market to the account's owner) and ``fees``. A deposit moves money from ``external`` into a
balance; escrow, holds, payouts, refunds, fees, transfers and withdrawals move it between the other books,
so the sum of all non-external books (the holdings) always equals the deposits. A withdrawal is recorded in
the ``withdrawn`` book rather than sent back to ``external``: nothing ever draws from that book, so the
audit counts every payout among the holdings and the deposits it checks them against stay what was
deposited. The functions here are pure: they turn a request into entries, or refuse it
with a reason, given the current books; the store applies the entries in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

EXTERNAL = "external"
FEES = "fees"
EntryKind = Literal[
    "deposit",
    "escrow_hold",
    "payout",
    "refund",
    "fee",
    "pay_hold",
    "pay_void",
    "audit_fee",
    "withdrawal",
    "transfer",
]


def balance_book(account: str) -> str:
    return f"balance:{account}"


def escrow_book(run_id: str) -> str:
    return f"escrow:{run_id}"


def held_book(run_id: str) -> str:
    return f"held:{run_id}"


def earned_book(account: str) -> str:
    return f"earned:{account}"


def withdrawn_book(account: str) -> str:
    return f"withdrawn:{account}"


class BookLimit(ValueError):
    """A book would hold more than the store can represent."""

    def __init__(self, book: str, limit: int):
        super().__init__(f"{book} would exceed {limit} units")
        self.book, self.limit = book, limit


class InsufficientFunds(ValueError):
    """A book would go below zero; the message says which and by how much."""

    def __init__(self, book: str, needed: int, available: int):
        super().__init__(f"{book} holds {available} units, {needed} needed")
        self.book, self.needed, self.available = book, needed, available


@dataclass(frozen=True)
class Entry:
    """``amount`` units (see peer.protocol.money) move from ``debit`` to ``credit``."""

    kind: EntryKind
    debit: str
    credit: str
    amount: int

    def __post_init__(self) -> None:
        if self.amount <= 0:
            raise ValueError(f"a ledger entry moves a positive amount, got {self.amount}")


def deposit(account: str, units: int) -> list[Entry]:
    return [Entry("deposit", EXTERNAL, balance_book(account), units)]


def hold_escrow(owner: str, run_id: str, units: int) -> list[Entry]:
    return [Entry("escrow_hold", balance_book(owner), escrow_book(run_id), units)]


def payout(run_id: str, account: str, units: int, fee_units: int = 0) -> list[Entry]:
    """Pay a peer from a run's escrow; an optional market fee goes to ``fees``."""
    entries = [Entry("payout", escrow_book(run_id), earned_book(account), units)]
    if fee_units:
        entries.append(Entry("fee", escrow_book(run_id), FEES, fee_units))
    return entries


def hold_pay(run_id: str, units: int) -> list[Entry]:
    """Set a report's pay aside while its audits are pending: the escrow cannot promise it twice."""
    return [Entry("pay_hold", escrow_book(run_id), held_book(run_id), units)] if units else []


def release_pay(run_id: str, account: str, units: int) -> list[Entry]:
    """Pay held pay to the peer: its audits passed."""
    return [Entry("payout", held_book(run_id), earned_book(account), units)] if units else []


def void_pay(run_id: str, units: int) -> list[Entry]:
    """Return held pay to the escrow: an audit failed or expired."""
    return [Entry("pay_void", held_book(run_id), escrow_book(run_id), units)] if units else []


def audit_fee(run_id: str, validator: str, units: int) -> list[Entry]:
    return [Entry("audit_fee", escrow_book(run_id), earned_book(validator), units)] if units else []


def hold_fee(run_id: str, units: int) -> list[Entry]:
    """Set a validator's audit fee aside until it passes a canary (or the run ends): the fee of an audit it
    may have faked is not paid before its answers are checked. Void it with :func:`void_pay`."""
    return [Entry("pay_hold", escrow_book(run_id), held_book(run_id), units)] if units else []


def release_fee(run_id: str, validator: str, units: int) -> list[Entry]:
    """Pay a validator the fees held for it."""
    return [Entry("audit_fee", held_book(run_id), earned_book(validator), units)] if units else []


def refund(run_id: str, owner: str, units: int) -> list[Entry]:
    return [Entry("refund", escrow_book(run_id), balance_book(owner), units)] if units else []


def spendable(account: str) -> tuple[str, str]:
    """The books an account's withdrawal or transfer draws from, in order: its earnings first, then its
    balance. Earnings first because they are what a renter was paid and wants out, while the balance holds
    what a launcher keeps to escrow into runs (a launch draws on the balance alone); the balance pays the
    rest, so a launcher can also take out what it deposited and did not spend."""
    return earned_book(account), balance_book(account)


def _draw(books: Mapping[str, int], account: str, units: int, kind: EntryKind, credit: str) -> list[Entry]:
    """Entries of ``kind`` that move ``units`` from the :func:`spendable` books of ``account`` to
    ``credit``, each book in turn until the amount is met; :class:`InsufficientFunds` (for the books
    together) when they hold less."""
    available = sum(books.get(book, 0) for book in spendable(account))
    if available < units:
        raise InsufficientFunds("+".join(spendable(account)), units, available)
    entries, left = [], units
    for book in spendable(account):
        part = min(left, books.get(book, 0))
        if part:
            entries.append(Entry(kind, book, credit, part))
        left -= part
    return entries


def withdraw(books: Mapping[str, int], account: str, units: int) -> list[Entry]:
    """Pay ``units`` out of the market to ``account``'s owner: a recorded payout into its ``withdrawn``
    book, drawn as :func:`spendable` says."""
    return _draw(books, account, units, "withdrawal", withdrawn_book(account))


def transfer(books: Mapping[str, int], sender: str, recipient: str, units: int) -> list[Entry]:
    """Move ``units`` from ``sender`` (drawn as :func:`spendable` says) into ``recipient``'s balance, where
    it can escrow runs, be transferred on or be withdrawn."""
    return _draw(books, sender, units, "transfer", balance_book(recipient))


def apply(books: Mapping[str, int], entries: Iterable[Entry], limit: int) -> dict[str, int]:
    """The books after ``entries``; :class:`InsufficientFunds` if a non-external book would go negative,
    :class:`BookLimit` if one would hold more than ``limit`` units."""
    after = dict(books)
    for entry in entries:
        available = after.get(entry.debit, 0)
        if entry.debit != EXTERNAL and available < entry.amount:
            raise InsufficientFunds(entry.debit, entry.amount, available)
        after[entry.debit] = available - entry.amount
        if after[entry.debit] < -limit:  # only `external` goes negative: by the sum of all deposits
            raise BookLimit(entry.debit, limit)
        after[entry.credit] = after.get(entry.credit, 0) + entry.amount
        if after[entry.credit] > limit:
            raise BookLimit(entry.credit, limit)
    return after


@dataclass(frozen=True)
class Audit:
    """``entries_checked``: the entries this audit replayed; ``last_entry``: the id of the last entry the
    running totals include after it (None for a check of the books alone)."""

    conserved: bool
    deposits: int
    holdings: int
    reason: str
    entries_checked: int = 0
    last_entry: int | None = None


def audit(books: Mapping[str, int]) -> Audit:
    """Money is conserved when the holdings equal the deposits and no book is negative."""
    deposits = -books.get(EXTERNAL, 0)
    holdings = sum(v for k, v in books.items() if k != EXTERNAL)
    negative = sorted(k for k, v in books.items() if k != EXTERNAL and v < 0)
    if negative:
        return Audit(False, deposits, holdings, f"negative books: {', '.join(negative)}")
    if holdings != deposits:
        return Audit(False, deposits, holdings, f"holdings {holdings} != deposits {deposits}")
    return Audit(True, deposits, holdings, "holdings equal deposits")


def replay(totals: Mapping[str, int], movements: Iterable[tuple[str, str, int]]) -> dict[str, int]:
    """The running totals of the books after ``movements``: (debit, credit, units) triples, each an entry or
    the sum of entries between the same two books. Books that come to zero are dropped, as a book that was
    never posted to holds zero."""
    after = dict(totals)
    for debit, credit, units in movements:
        after[debit] = after.get(debit, 0) - units
        after[credit] = after.get(credit, 0) + units
    return {book: units for book, units in after.items() if units}


def changed_books(before: Mapping[str, int], after: Mapping[str, int]) -> list[str]:
    """The names of the books that hold different units in ``before`` and ``after``, sorted; a book absent
    from either holds 0."""
    return sorted(name for name in before.keys() | after.keys() if before.get(name, 0) != after.get(name, 0))


def differences(books: Mapping[str, int], replayed: Mapping[str, int], limit: int = 5) -> str:
    """The books whose units differ from what their entries add up to, at most ``limit`` of them by name
    ("balance:a holds 7 units, its entries 5"), or "" when none do. A book absent from either holds 0."""
    names = changed_books(books, replayed)
    shown = [
        f"{name} holds {books.get(name, 0)} units, its entries {replayed.get(name, 0)}" for name in names
    ]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return "; ".join(shown[:limit]) + more


def audit_entries(
    books: Mapping[str, int], replayed: Mapping[str, int], *, entries_checked: int, last_entry: int
) -> Audit:
    """:func:`audit` of the books, and the books against ``replayed``, the totals their entries add up to
    (:func:`replay`): conserved only when both hold. A book that differs is named with both figures."""
    result = audit(books)
    differ = differences(books, replayed)
    reasons = ([f"books differ from their entries: {differ}"] if differ else []) + (
        [] if result.conserved else [result.reason]
    )
    return Audit(
        conserved=not reasons,
        deposits=result.deposits,
        holdings=result.holdings,
        reason="; ".join(reasons) or "holdings equal deposits and every book its entries",
        entries_checked=entries_checked,
        last_entry=last_entry,
    )
