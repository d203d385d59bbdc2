"""Money: exact decimals with a fixed number of places, stored as integer micro-units.

JSON numbers are floats in most clients, so the API only accepts money as a decimal string ("12.50");
the store keeps integers so that sums are exact and SQLite never rounds.
"""

from __future__ import annotations

import re
from decimal import Decimal

PLACES = 6
UNIT = 10**PLACES
INTEGER_DIGITS = 12
# SQLite integers stop at 2**63 - 1 (about 9.2e18 micro-units); no book may hold more than this, so that
# sums of amounts (each below 10**12, i.e. 10**18 units) are checked before they could overflow.
MAX_UNITS = 2**63 - 1
_MONEY_RE = re.compile(rf"[0-9]{{1,{INTEGER_DIGITS}}}(\.[0-9]{{1,{PLACES}}})?")


def parse_money(value: object) -> Decimal:
    """A non-negative decimal string with at most PLACES decimals; the error says what is wrong.

    A ``Decimal`` is accepted too, without the digit limit (server-side sums); wire formats cannot
    produce one.
    """
    if isinstance(value, Decimal):  # a sum the server computed, which may exceed any single amount
        if not value.is_finite() or value < 0 or value != value.quantize(Decimal(1).scaleb(-PLACES)):
            raise ValueError(f"{value} is not a non-negative amount with at most {PLACES} decimal places")
        return value
    if not isinstance(value, str):
        raise ValueError(
            f'money must be a decimal string such as "12.50", not {type(value).__name__} {value!r}'
        )
    if not _MONEY_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a non-negative decimal below 10**{INTEGER_DIGITS}"
            f" with at most {PLACES} decimal places"
        )
    return Decimal(value)


def to_units(amount: Decimal) -> int:
    """Exact integer micro-units of an amount that has at most PLACES decimals."""
    units = amount * UNIT
    if units != units.to_integral_value():
        raise ValueError(f"{amount} has more than {PLACES} decimal places")
    return int(units)


def from_units(units: int) -> Decimal:
    return (Decimal(units) / UNIT).quantize(Decimal(1).scaleb(-PLACES))


def format_units(units: int) -> str:
    """The API's money string: always PLACES decimals, e.g. '12.500000'."""
    return str(from_units(units))


def fmt_money(amount: Decimal | None) -> str:
    """Money for people: at least 2 decimals, no trailing zeros beyond them; "-" for none."""
    if amount is None:
        return "-"
    return f"{amount:.2f}" if amount == round(amount, 2) else f"{amount.normalize():f}"
