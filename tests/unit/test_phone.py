"""Phone input: one E.164 spelling per number, look-alike input rejected, masking."""

from __future__ import annotations

import re
from collections.abc import Iterator

import phonenumbers
import pytest

from phonebind_server.domain import phone as phone_module
from phonebind_server.domain.errors import DomainError, FieldViolation, Reason
from phonebind_server.domain.phone import (
    MAX_PHONE_INPUT_LENGTH,
    PhoneNumber,
    is_virtual_operator,
    mask_phone,
    parse_phone,
    province_code,
)

E164 = "+8613800138000"


def reject(raw: str, **kwargs: object) -> str:
    """Parse `raw`, expect INVALID_PHONE, and return the operator-facing description."""
    with pytest.raises(DomainError) as excinfo:
        parse_phone(raw, **kwargs)  # type: ignore[arg-type]
    error = excinfo.value
    assert error.reason is Reason.INVALID_PHONE
    field = str(kwargs.get("field", "phone"))
    assert error.violations == (FieldViolation(field, error.message),)
    assert_no_input_digits(raw, error.message)
    return error.message


def assert_no_input_digits(raw: str, description: str) -> None:
    """No run of digits from the input, in any script, appears in the description."""
    for run in re.findall(r"\d{2,}", raw):  # \d on purpose: catch every script here
        assert run not in description
    assert not any(char.isdigit() for char in description), description


# --- accepted formats ---------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "+8613800138000",
        "13800138000",
        "008613800138000",
        "+86 138 0013 8000",
        "+86-138-0013-8000",
        "138 0013 8000",
        "138-0013-8000",
        "0086 138 0013 8000",
        "0086-13800138000",
        "8613800138000",  # country code without '+' is still recognised
    ],
)
def test_accepted_formats_normalise_to_one_e164(raw: str) -> None:
    number = parse_phone(raw)
    assert number == PhoneNumber(e164=E164, region="CN")
    assert number.national == "13800138000"


def test_result_is_frozen() -> None:
    number = parse_phone(E164)
    with pytest.raises(AttributeError):
        number.e164 = "+8613900000000"  # type: ignore[misc]


# --- rejected shapes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("+86 10 6552 9988", "landline (Beijing) in E.164"),
        ("010 6552 9988", "landline in national format"),
        ("+862165529988", "landline (Shanghai)"),
    ],
)
def test_landline_rejected_as_not_mobile(raw: str, why: str) -> None:
    assert reject(raw) == "must be a mobile number", why


@pytest.mark.parametrize(
    "raw",
    [
        "1380013800",  # one digit short
        "138001380000",  # one digit long
        "12345678901",  # no such range
        "10086",  # service number
        "+86",
        "+999 1234 5678",  # unassigned country code
        "0",
    ],
)
def test_invalid_numbers_rejected(raw: str) -> None:
    assert reject(raw) == "is not a valid phone number"


def test_empty_rejected() -> None:
    assert reject("") == "is required"


def test_very_long_input_rejected_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("phonenumbers.parse called on over-long input")

    monkeypatch.setattr(phone_module.phonenumbers, "parse", must_not_parse)
    assert reject("1" * 10_000) == "is too long"
    assert reject("\uff11" * 10_000) == "is too long"
    assert reject("1" * (MAX_PHONE_INPUT_LENGTH + 1)) == "is too long"


def test_length_cap_is_inclusive() -> None:
    # 32 characters is looked at (and found invalid for another reason).
    assert reject("1" * MAX_PHONE_INPUT_LENGTH) != "is too long"


def in_script(zero: int, ascii_digits: str) -> str:
    """The same digits written in another script whose zero is code point `zero`."""
    return "".join(chr(zero + int(digit)) for digit in ascii_digits)


FULL_WIDTH = in_script(0xFF10, "13800138000")
ARABIC_INDIC = in_script(0x0660, "13800138000")
PERSIAN = in_script(0x06F0, "13800138000")
DEVANAGARI = in_script(0x0966, "13800138000")


def test_phonenumbers_alone_would_fold_unicode_digits() -> None:
    """Why parse_phone screens characters itself."""
    for look_alike in (FULL_WIDTH, ARABIC_INDIC):
        assert phonenumbers.is_valid_number(phonenumbers.parse(look_alike, "CN"))


CHARSET = "may only contain ASCII digits, a leading '+', spaces and hyphens"
SEPARATORS = "may only have single spaces or hyphens between digits"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (FULL_WIDTH, CHARSET),
        ("\uff0b86" + FULL_WIDTH, CHARSET),  # full-width plus sign
        ("138\uff10\uff10138000", CHARSET),  # mixed full-width
        (ARABIC_INDIC, CHARSET),
        (PERSIAN, CHARSET),
        (DEVANAGARI, CHARSET),
        ("\u00b938001380000", CHARSET),  # superscript one
        ("13800138000\x00", CHARSET),
        ("\x0013800138000", CHARSET),
        ("138\x0000138000", CHARSET),
        ("1380013800O", CHARSET),  # letter O
        ("13800138000abc", CHARSET),
        ("abc13800138000", CHARSET),
        ("tel:+8613800138000", CHARSET),
        ("++8613800138000", CHARSET),
        ("86+13800138000", CHARSET),
        ("(138) 0013 8000", CHARSET),
        ("138.0013.8000", CHARSET),
        ("138_0013_8000", CHARSET),
        ("\u200b13800138000", CHARSET),  # zero-width space
        ("138\u00a00013\u00a08000", CHARSET),  # no-break spaces
        ("13800138000\n", CHARSET),
        ("\t13800138000", CHARSET),
        (" 13800138000", SEPARATORS),
        ("-13800138000", SEPARATORS),
        ("+ 8613800138000", SEPARATORS),
        ("138  0013 8000", SEPARATORS),
        ("138 - 0013 8000", SEPARATORS),
        ("   ", SEPARATORS),
        ("13800138000 ", "must end with a digit"),
        ("13800138000-", "must end with a digit"),
        ("+", "must contain digits"),
    ],
)
def test_garbage_rejected_before_parsing(raw: str, expected: str) -> None:
    assert reject(raw) == expected


def test_field_name_is_reported() -> None:
    assert reject("abc", field="new_phone") == CHARSET


# --- regions --------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["+852 9123 4567", "+1 201 555 0123", "+853 6612 3456"])
def test_region_not_allowed_rejected(raw: str) -> None:
    assert reject(raw) == "is from a region that is not allowed"


@pytest.mark.parametrize(
    ("raw", "regions", "expected"),
    [
        ("+852 9123 4567", ("CN", "HK"), PhoneNumber("+85291234567", "HK")),
        ("+852 9123 4567", ("cn", "hk"), PhoneNumber("+85291234567", "HK")),
        ("00852 9123 4567", ("CN", "HK"), PhoneNumber("+85291234567", "HK")),
        ("+1 201 555 0123", ("US",), PhoneNumber("+12015550123", "US")),  # FIXED_LINE_OR_MOBILE
        ("201-555-0123", ("US",), PhoneNumber("+12015550123", "US")),  # national, default US
        ("9123 4567", ("HK", "CN"), PhoneNumber("+85291234567", "HK")),
        ("13800138000", ("CN", "HK"), PhoneNumber(E164, "CN")),
    ],
)
def test_region_accepted_when_allowed(
    raw: str, regions: tuple[str, ...], expected: PhoneNumber
) -> None:
    assert parse_phone(raw, allowed_regions=regions) == expected


def test_national_format_uses_first_allowed_region() -> None:
    # Eight digits read as a Hong Kong number only when HK comes first.
    assert parse_phone("91234567", allowed_regions=("HK", "CN")).region == "HK"
    assert reject("91234567", allowed_regions=("CN", "HK")) == "is not a valid phone number"


def test_allowed_regions_must_not_be_empty() -> None:
    with pytest.raises(ValueError):
        parse_phone(E164, allowed_regions=())


def test_allowed_regions_may_be_any_iterable() -> None:
    def regions() -> Iterator[str]:
        yield "CN"

    assert parse_phone("13800138000", allowed_regions=regions()).e164 == E164


# --- masking ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("national", "masked"),
    [
        ("13800138000", "138****8000"),
        ("123456789012", "123*****9012"),
        ("91234567", "912*4567"),
        ("1234567", "*****67"),
        ("123", "*23"),
        ("12", "**"),
        ("", ""),
    ],
)
def test_mask_phone(national: str, masked: str) -> None:
    assert mask_phone(national) == masked
    assert len(masked) == len(national)


def test_phone_number_masked_and_repr_hide_the_number() -> None:
    number = parse_phone(E164)
    assert number.masked() == "138****8000"
    assert "13800138000" not in repr(number)
    assert "138****8000" in repr(number)


def test_national_of_other_regions() -> None:
    assert parse_phone("+852 9123 4567", allowed_regions=("HK",)).national == "91234567"
    assert parse_phone("+1 201 555 0123", allowed_regions=("US",)).national == "2015550123"


# --- virtual operators ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "virtual"),
    [
        ("+8616212345678", True),
        ("+8616512345678", True),
        ("+8616712345678", True),
        ("+8617012345678", True),
        ("+8617112345678", True),
        ("+8613800138000", False),
        ("+8617212345678", False),
        ("+8619912345678", False),
    ],
)
def test_is_virtual_operator(raw: str, virtual: bool) -> None:
    assert is_virtual_operator(parse_phone(raw)) is virtual


def test_is_virtual_operator_custom_prefixes() -> None:
    number = parse_phone(E164)
    assert is_virtual_operator(number, ("138",)) is True
    assert is_virtual_operator(number, ["170"]) is False
    assert is_virtual_operator(number, ()) is False


def test_is_virtual_operator_only_for_cn() -> None:
    assert is_virtual_operator(PhoneNumber("+11705550123", "US")) is False


# --- province ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "province"),
    [
        ("+8613800138000", "11"),  # geocoder: "北京市"
        ("+8613510000000", "44"),  # geocoder: "广东省深圳市"
        ("+8613926000000", "44"),  # geocoder: "广东省广州市"
        ("+8613001312345", "12"),
        ("+8613000691234", "45"),  # geocoder: "广西南宁市"
        ("+8613000951234", "15"),  # geocoder: "内蒙古包头市"
        ("+8617012345678", None),  # geocoder only knows the country
    ],
)
def test_province_code(raw: str, province: str | None) -> None:
    assert province_code(parse_phone(raw)) == province


def test_province_code_non_cn_is_none() -> None:
    assert province_code(parse_phone("+852 9123 4567", allowed_regions=("HK",))) is None
