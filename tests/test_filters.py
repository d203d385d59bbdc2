"""The offer filter language: every operator evaluated, every kind of bad input rejected by name."""

from __future__ import annotations

from decimal import Decimal

import pytest

from coordinator.filters import FieldKind, FilterError, compile_filter, parse_sort

FIELDS = {
    "gpu": FieldKind.STRING,
    "vram_gb": FieldKind.NUMBER,
    "price": FieldKind.NUMBER,
    "reliability": FieldKind.NUMBER,
}
H100 = {"gpu": "H100", "vram_gb": 80, "price": Decimal("2.40"), "reliability": 0.95}
A100 = {"gpu": "A100", "vram_gb": 40.0, "price": Decimal("1.10"), "reliability": 0.9}
RTX = {"gpu": "RTX 4090", "vram_gb": 24, "price": Decimal("0.45"), "reliability": 0.99}
OFFERS = {"h100": H100, "a100": A100, "rtx": RTX}


def selected(expr: str) -> set[str]:
    keep = compile_filter(expr, FIELDS)
    return {name for name, offer in OFFERS.items() if keep(offer)}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("", {"h100", "a100", "rtx"}),
        ("   ", {"h100", "a100", "rtx"}),
        ("gpu=H100", {"h100"}),
        ("gpu==h100", {"h100"}),
        ("gpu!=A100", {"h100", "rtx"}),
        ("price<1.10", {"rtx"}),
        ("price<=1.1", {"rtx", "a100"}),
        ("price>1.1", {"h100"}),
        ("price>=1.10", {"h100", "a100"}),
        ("vram_gb=40", {"a100"}),
        ("vram_gb!=40", {"h100", "rtx"}),
        ("gpu in H100,A100", {"h100", "a100"}),
        ("gpu in [h100, a100]", {"h100", "a100"}),
        ("gpu IN [RTX_4090]", {"rtx"}),
        ("vram_gb in 24,80", {"h100", "rtx"}),
        ("price in [0.450, 2.4]", {"h100", "rtx"}),
        ("price <= 2.5 vram_gb >= 40", {"h100", "a100"}),
        ("gpu=H100 vram_gb>=40 price<=2.5 reliability>0.9 gpu!=A100 gpu in H100,A100", {"h100"}),
        ("price<=2.5 price>2.4", set()),
    ],
)
def test_operators_select_the_right_offers(expr: str, expected: set[str]) -> None:
    assert selected(expr) == expected


def test_strings_ignore_case_and_underscores() -> None:
    assert selected("gpu=rtx_4090") == {"rtx"}
    assert selected("gpu=RTX 4090".replace(" ", "_")) == {"rtx"}


def test_floats_compare_by_the_digits_people_see() -> None:
    # 0.9 as a binary float is slightly above 0.9; the listing must still treat it as 0.9.
    assert selected("reliability<=0.9") == {"a100"}
    assert selected("reliability=0.90") == {"a100"}
    assert selected("reliability>0.9") == {"h100", "rtx"}


def test_missing_or_empty_fields_match_nothing() -> None:
    keep_gpu, keep_price = compile_filter("gpu!=A100", FIELDS), compile_filter("price<10", FIELDS)
    assert not keep_gpu({"price": Decimal(1)})
    assert not keep_gpu({"gpu": None})
    assert not keep_price({"gpu": "H100"})
    assert not keep_price({"price": float("nan")})
    assert keep_price({"price": 3})


def test_record_of_the_wrong_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="expected a number"):
        compile_filter("price<10", FIELDS)({"price": "cheap"})


def error(expr: str) -> FilterError:
    with pytest.raises(FilterError) as info:
        compile_filter(expr, FIELDS)
    return info.value


@pytest.mark.parametrize(
    ("expr", "term", "reason"),
    [
        ("gpu=H100 gpux=A100", "gpux=A100", "unknown field 'gpux'; known fields: gpu, price, reliability,"),
        ("price~2", "price~2", "unknown operator '~'"),
        ("price=>2", "price=>2", "unknown operator '=>'"),
        ("gpu like H100", "gpu like H100", "unknown operator 'like'"),
        ("gpu H100 price<2", "gpu H100", "unknown operator 'H100'"),
        ("gpu", "gpu", "missing operator"),
        ("=H100", "=H100", "missing field name"),
        ("price<=abc", "price<=abc", "a number expected but got 'abc'"),
        ("vram_gb in 40,big", "vram_gb in 40,big", "a number expected but got 'big'"),
        ("price=nan", "price=nan", "a number expected but got 'nan'"),
        ("gpu<H100", "gpu<H100", "ordering operator '<' needs a number field"),
        ("gpu>=A", "gpu>=A", "ordering operator '>=' needs a number field"),
        ("gpu=", "gpu=", "empty value"),
        ("gpu= price<2", "gpu=", "empty value"),
        ("gpu in []", "gpu in []", "empty value"),
        ("gpu in", "gpu in", "empty value"),
        ("gpu in H100,,A100", "gpu in H100,,A100", "empty value"),
        ("gpu in H100, A100", "gpu in H100,", "put a list with spaces in brackets"),
        ("gpu in [H100", "gpu in [H100", "unbalanced '['"),
        ("price=1,2", "price=1,2", "needs the 'in' operator"),
        ("price< vram_gb>2", "price<", "empty value"),
        ("price=2 ~ gpu=H100", "~ gpu", "missing field name"),
    ],
)
def test_bad_terms_are_named_with_the_reason(expr: str, term: str, reason: str) -> None:
    err = error(expr)
    assert err.term == term
    assert reason in err.reason
    assert repr(term) in str(err) and reason in str(err)


def test_parse_sort() -> None:
    assert parse_sort("price", FIELDS) == ("price", False)
    assert parse_sort("-price", FIELDS) == ("price", True)
    assert parse_sort(" +vram_gb ", FIELDS) == ("vram_gb", False)
    assert parse_sort("gpu", FIELDS) == ("gpu", False)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty sort field"),
        ("-", "empty sort field"),
        ("-cost", "unknown field 'cost'"),
        ("--price", "unknown field '-price'"),
    ],
)
def test_parse_sort_rejects_bad_specs(spec: str, reason: str) -> None:
    with pytest.raises(FilterError, match=reason) as info:
        parse_sort(spec, FIELDS)
    assert info.value.term == spec
