"""The offer filter language people know from GPU markets (Vast.ai style).

    hivemarket offers 'gpu=H100 vram_gb>=40 price<=2.5 reliability>0.9 gpu in [H100,A100]' --sort -price

An expression is a whitespace-separated conjunction of ``field OP value`` terms, OP one of
``= != < <= > >= in`` (``==`` is accepted for ``=``, as Vast.ai users type it). ``in`` takes a
comma-separated list, optionally in brackets (``[H100, A100]``; only inside brackets may a list
contain spaces). Spaces around the symbolic operators are allowed (``price <= 2.5``).

Semantics, chosen so a listing never surprises the person reading it:
- number fields compare as Decimal; a float in a record is read through ``repr`` (the digits a
  person sees), so ``reliability<=0.9`` matches 0.9 although the binary float is a hair above it;
- string fields compare case-insensitively and treat ``_`` as a space, so ``gpu=rtx_4090``
  matches "RTX 4090" without quoting; ordering operators on strings are rejected;
- a record that lacks the field (or holds None or NaN) matches no term on it, ``!=`` included.

Bad input raises ``FilterError`` naming the term and the reason, so the CLI can print it as is.
"""

from __future__ import annotations

import enum
import operator
import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

Record = Mapping[str, Any]
Predicate = Callable[[Record], bool]


class FieldKind(enum.Enum):
    """How a field's values compare."""

    STRING = "string"
    NUMBER = "number"


class FilterError(ValueError):
    """A filter or sort spec that cannot be compiled; ``term`` is the offending piece of input."""

    def __init__(self, term: str, reason: str) -> None:
        super().__init__(f"bad filter term {term!r}: {reason}")
        self.term = term
        self.reason = reason


_ORDERING = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_OPERATORS = ("=", "!=", *_ORDERING, "in")
_EXPECTED_OPS = "expected one of " + " ".join(_OPERATORS)

_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<list>\[[^\]]*\])
      | (?P<op>[<>=!~]+)
      | (?P<word>[^\s<>=!~\[\]]+)
      | (?P<stray>[\[\]])""",
    re.VERBOSE,
)


class _Token:
    __slots__ = ("end", "kind", "start", "text")

    def __init__(self, match: re.Match[str]) -> None:
        self.kind = match.lastgroup or ""
        self.text = match.group()
        self.start, self.end = match.span()


def compile_filter(expr: str, fields: Mapping[str, FieldKind]) -> Predicate:
    """Compile ``expr`` into a predicate over records (mappings from field name to value).

    Everything is checked here, once, so evaluating the predicate over thousands of offers does no
    parsing and cannot fail on the user's input. A blank expression matches everything.
    """
    tokens = [_Token(m) for m in _TOKEN.finditer(expr) if m.lastgroup != "space"]
    terms: list[Predicate] = []
    i = 0
    while i < len(tokens):
        predicate, i = _term(expr, tokens, i, fields)
        terms.append(predicate)
    return lambda record: all(term(record) for term in terms)


def parse_sort(spec: str, fields: Mapping[str, FieldKind]) -> tuple[str, bool]:
    """``price`` -> ("price", False); ``-price`` -> ("price", True), i.e. (field, descending)."""
    text = spec.strip()
    descending = text.startswith("-")
    name = text[1:] if text[:1] in ("-", "+") else text
    if not name:
        raise FilterError(spec, "empty sort field; give a field name, '-' in front for descending")
    _check_field(spec, name, fields)
    return name, descending


def _term(expr: str, tokens: list[_Token], i: int, fields: Mapping[str, FieldKind]) -> tuple[Predicate, int]:
    """Parse the term starting at tokens[i]; return its predicate and the index after it."""
    first = tokens[i]

    def text(last: int) -> str:
        return expr[first.start : tokens[min(last, len(tokens) - 1)].end]

    if first.kind == "stray":
        raise FilterError(expr[first.start :], f"unbalanced {first.text!r}")
    if first.kind != "word":
        raise FilterError(text(i + 1), "missing field name before the operator")
    if i + 1 >= len(tokens):
        raise FilterError(first.text, f"missing operator after field {first.text!r}; {_EXPECTED_OPS}")
    op_token, value_at = tokens[i + 1], i + 2
    # The value is the word or list right after the operator, unless a space separates them and an
    # operator follows it: then it is the next term's field ('gpu= price<2' lacks a value).
    has_value = (
        value_at < len(tokens)
        and tokens[value_at].kind in ("word", "list")
        and (
            tokens[value_at].start == op_token.end
            or not (value_at + 1 < len(tokens) and tokens[value_at + 1].kind == "op")
        )
    )
    op = "in" if op_token.text.lower() == "in" else "=" if op_token.text == "==" else op_token.text
    if op not in _OPERATORS or (op_token.kind != "op" and op != "in"):  # 'gpu~x', 'gpu like x', 'gpu x'
        end = value_at if has_value or op_token.kind == "op" else i + 1
        raise FilterError(text(end), f"unknown operator {op_token.text!r}; {_EXPECTED_OPS}")
    if value_at < len(tokens) and tokens[value_at].kind == "stray":
        raise FilterError(expr[first.start :], f"unbalanced {tokens[value_at].text!r}")
    if not has_value:
        raise FilterError(text(i + 1), "empty value")
    term = text(value_at)
    kind = _check_field(term, first.text, fields)
    values = _values(term, op, tokens[value_at], kind)
    return _predicate(first.text, op, kind, values), value_at + 1


def _check_field(term: str, name: str, fields: Mapping[str, FieldKind]) -> FieldKind:
    if name not in fields:
        raise FilterError(term, f"unknown field {name!r}; known fields: {', '.join(sorted(fields))}")
    return fields[name]


def _values(term: str, op: str, token: _Token, kind: FieldKind) -> list[Decimal] | list[str]:
    """The term's constant(s), parsed and normalised for ``kind``."""
    if op != "in" and (token.kind == "list" or "," in token.text):
        raise FilterError(term, f"a list of values needs the 'in' operator, not {op!r}")
    if op in _ORDERING and kind is FieldKind.STRING:
        raise FilterError(term, f"ordering operator {op!r} needs a number field; this one is a string")
    raw = token.text[1:-1] if token.kind == "list" else token.text
    items = [item.strip() for item in raw.split(",")]
    if any(not item for item in items):
        hint = " (put a list with spaces in brackets: [a, b])" if token.kind == "word" else ""
        raise FilterError(term, "empty value" + hint)
    if kind is FieldKind.STRING:
        return [_normal_string(item) for item in items]
    return [_parse_number(term, item) for item in items]


def _parse_number(term: str, text: str) -> Decimal:
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = Decimal("NaN")
    if not number.is_finite():
        raise FilterError(term, f"a number expected but got {text!r}")
    return number


def _predicate(name: str, op: str, kind: FieldKind, values: list[Decimal] | list[str]) -> Predicate:
    """The test one term applies to a record."""
    read = _record_number if kind is FieldKind.NUMBER else _record_string
    if op == "in":
        allowed = frozenset(values)
        test: Callable[[Any], bool] = allowed.__contains__
    elif op == "=":
        test = values[0].__eq__
    elif op == "!=":
        test = values[0].__ne__
    else:
        compare, constant = _ORDERING[op], values[0]
        test = lambda value: compare(value, constant)  # noqa: E731

    def predicate(record: Record) -> bool:
        value = read(record.get(name))
        return value is not None and bool(test(value))

    return predicate


def _normal_string(value: str) -> str:
    """Case- and underscore-insensitive form: ``rtx_4090`` and ``RTX 4090`` are the same GPU."""
    return value.replace("_", " ").casefold()


def _record_string(value: Any) -> str | None:
    return None if value is None else _normal_string(str(value))


def _record_number(value: Any) -> Decimal | None:
    """A record's number as Decimal; None (matches nothing) when absent or NaN."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        value = Decimal(repr(value))
    elif isinstance(value, int):
        value = Decimal(value)
    elif not isinstance(value, Decimal):
        raise TypeError(f"expected a number, got {type(value).__name__}: {value!r}")
    return None if value.is_nan() else value
