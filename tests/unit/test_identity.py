"""ID numbers (GB 11643-1999) and holder names: one canonical spelling, look-alikes rejected."""

from __future__ import annotations

import datetime
import re
import types
import unicodedata

import pytest

from phonebind_server.domain import identity
from phonebind_server.domain.errors import DomainError, FieldViolation, Reason
from phonebind_server.domain.identity import (
    COMPOUND_SURNAMES,
    id_check_character,
    id_province,
    mask_id_number,
    mask_name,
    normalize_id_number,
    normalize_name,
)

TODAY = datetime.date(2024, 6, 15)
EXAMPLE_ID = "11010519491231002X"  # the GB 11643-1999 worked example


def check_character(first17: str) -> str:
    """ISO 7064 MOD 11-2, written out independently of the module under test."""
    weights = [2 ** (17 - i) % 11 for i in range(17)]  # 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2
    remainder = sum(int(d) * w for d, w in zip(first17, weights, strict=True)) % 11
    return {0: "1", 1: "0", 2: "X"}.get(remainder, str(12 - remainder))


def build_id(region: str = "440305", birth: str = "19900307", sequence: str = "123") -> str:
    first17 = region + birth + sequence
    assert len(first17) == 17
    return first17 + check_character(first17)


def build_id_ending_in_digit(region: str = "440305", birth: str = "19900307") -> str:
    for n in range(1000):
        candidate = build_id(region, birth, f"{n:03d}")
        if candidate[-1] != "X":
            return candidate
    raise AssertionError("unreachable")


def with_wrong_check(id_number: str) -> str:
    wrong = "0" if id_number[-1] != "0" else "1"
    return id_number[:-1] + wrong


def reject_id(raw: str, *, today: datetime.date = TODAY, field: str = "id_number") -> str:
    with pytest.raises(DomainError) as excinfo:
        normalize_id_number(raw, today=today, field=field)
    error = excinfo.value
    assert error.reason is Reason.INVALID_ID_NUMBER
    assert error.violations == (FieldViolation(field, error.message),)
    for run in re.findall(r"\d{3,}", raw):  # \d on purpose: catch every script here
        assert run not in error.message
    return error.message


def reject_name(raw: str, *, field: str = "holder_name") -> str:
    with pytest.raises(DomainError) as excinfo:
        normalize_name(raw, field=field)
    error = excinfo.value
    assert error.reason is Reason.INVALID_ARGUMENT
    assert error.violations == (FieldViolation(field, error.message),)
    stripped = raw.strip()
    if len(stripped) >= 2:
        assert stripped not in error.message
    return error.message


# --- ID numbers: accepted ----------------------------------------------------------


def test_test_helper_matches_the_standard_example() -> None:
    assert check_character(EXAMPLE_ID[:17]) == "X"
    assert id_check_character(EXAMPLE_ID[:17]) == "X"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (EXAMPLE_ID, EXAMPLE_ID),
        ("11010519491231002x", EXAMPLE_ID),
        ("  11010519491231002X\t\n", EXAMPLE_ID),
        (" 11010519491231002x ", EXAMPLE_ID),
    ],
)
def test_valid_example(raw: str, expected: str) -> None:
    assert normalize_id_number(raw, today=TODAY) == expected


def test_valid_number_ending_in_digit() -> None:
    id_number = build_id_ending_in_digit()
    assert id_number[-1] in "0123456789"
    assert id_number.startswith("44030519900307")
    assert normalize_id_number(id_number, today=TODAY) == id_number


@pytest.mark.parametrize("sequence", [f"{n:03d}" for n in range(0, 1000, 37)])
def test_check_character_agrees_with_independent_implementation(sequence: str) -> None:
    id_number = build_id(sequence=sequence)
    assert id_check_character(id_number[:17]) == id_number[-1]
    assert normalize_id_number(id_number.lower(), today=TODAY) == id_number


@pytest.mark.parametrize(
    "region", ["110105", "120101", "150102", "230102", "460106", "540102", "650102", "710000"]
)
def test_province_codes_accepted(region: str) -> None:
    id_number = build_id(region=region)
    assert normalize_id_number(id_number, today=TODAY) == id_number


@pytest.mark.parametrize("region", ["810000", "820000", "910000"])
def test_special_region_codes_accepted(region: str) -> None:
    id_number = build_id(region=region)
    assert normalize_id_number(id_number, today=TODAY) == id_number


def test_birth_date_boundaries_accepted() -> None:
    on_today = build_id(birth=TODAY.strftime("%Y%m%d"))
    assert normalize_id_number(on_today, today=TODAY) == on_today
    earliest = build_id(birth="19000101")
    assert normalize_id_number(earliest, today=TODAY) == earliest
    leap_day = build_id(birth="20000229")
    assert normalize_id_number(leap_day, today=TODAY) == leap_day


# --- ID numbers: rejected ---------------------------------------------------------


def test_wrong_check_character() -> None:
    assert reject_id(with_wrong_check(EXAMPLE_ID)) == "check character does not match"
    digit_ending = build_id_ending_in_digit()
    assert reject_id(with_wrong_check(digit_ending)) == "check character does not match"
    assert reject_id(digit_ending[:-1] + "X") == "check character does not match"


@pytest.mark.parametrize(
    "raw",
    [
        EXAMPLE_ID[:17],
        EXAMPLE_ID + "0",
        EXAMPLE_ID[:15],  # the retired 15-digit format
        "1" * 10_000,
        " " * 10_000 + EXAMPLE_ID,
        "110105 19491231002X",
        "\x0011010519491231002X",
    ],
)
def test_wrong_length(raw: str) -> None:
    assert reject_id(raw) == "must be 18 characters"


@pytest.mark.parametrize("raw", ["", "   ", "\t\n"])
def test_empty(raw: str) -> None:
    assert reject_id(raw) == "is required"


@pytest.mark.parametrize(
    "raw",
    [
        # Full-width digits (18 characters; would be a valid number if folded).
        "".join(chr(ord(c) + 0xFEE0) for c in EXAMPLE_ID[:17]) + "X",
        # Arabic-Indic digits.
        "".join(chr(0x0660 + int(c)) for c in EXAMPLE_ID[:17]) + "X",
        # One Arabic-Indic digit among ASCII ones.
        "\u0661" + EXAMPLE_ID[1:],
        # Devanagari digit.
        EXAMPLE_ID[:5] + "\u096b" + EXAMPLE_ID[6:],
        # NUL inside.
        EXAMPLE_ID[:8] + "\x00" + EXAMPLE_ID[9:],
        # Letter, sign and space inside.
        EXAMPLE_ID[:3] + "O" + EXAMPLE_ID[4:],
        "+" + EXAMPLE_ID[1:],
        EXAMPLE_ID[:9] + " " + EXAMPLE_ID[10:],
    ],
)
def test_non_ascii_digits_rejected(raw: str) -> None:
    assert len(raw.strip()) == 18
    assert reject_id(raw) == "first 17 characters must be ASCII digits"


@pytest.mark.parametrize(
    "last",
    # Y, NUL, full-width X, Arabic-Indic one, full-width one, star, multiplication sign
    ["Y", "\x00", "\uff38", "\u0661", "\uff11", "*", "\u00d7"],
)
def test_bad_last_character(last: str) -> None:
    assert reject_id(EXAMPLE_ID[:17] + last) == "last character must be an ASCII digit or X"


@pytest.mark.parametrize("region", ["990000", "000000", "100000", "160000", "720000", "830000"])
def test_unknown_province_code(region: str) -> None:
    assert reject_id(build_id(region=region)) == "region code is not a known province"


@pytest.mark.parametrize("birth", ["19900230", "19900431", "19901301", "19900001", "19000229"])
def test_impossible_birth_date(birth: str) -> None:
    assert reject_id(build_id(birth=birth)) == "birth date is not a real date"


def test_future_birth_date_relative_to_injected_today() -> None:
    id_number = build_id(birth="20240616")
    assert reject_id(id_number, today=TODAY) == "birth date is in the future"
    assert normalize_id_number(id_number, today=TODAY + datetime.timedelta(days=1)) == id_number


@pytest.mark.parametrize("birth", ["18991231", "18000101"])
def test_birth_date_before_1900(birth: str) -> None:
    assert reject_id(build_id(birth=birth)) == "birth date is before 1900"


def test_custom_field_name() -> None:
    assert reject_id("nope", field="holder_id") == "must be 18 characters"


def test_id_province_and_mask() -> None:
    assert id_province(EXAMPLE_ID) == "11"
    assert id_province(build_id()) == "44"
    assert mask_id_number(EXAMPLE_ID) == "110***********002X"
    id_number = build_id_ending_in_digit()
    assert mask_id_number(id_number) == "440" + "*" * 11 + id_number[-4:]
    assert id_number[3:14] not in mask_id_number(id_number)


# --- names: accepted --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("张三", "张三"),
        ("  张三  ", "张三"),
        ("\u3000张三\u3000", "张三"),
        ("\t张三\n", "张三"),
        ("Li Lei", "Li Lei"),
        ("Li   Lei", "Li Lei"),
        ("Li \t\n Lei", "Li Lei"),
        ("Li\u3000\u3000Lei", "Li Lei"),
        ("\u00a0Li\u2003Lei\u202f", "Li Lei"),
        ("O'Brien", "O'Brien"),
        ("Jean-Luc Picard", "Jean-Luc Picard"),
        ("阿卜杜拉·买买提", "阿卜杜拉·买买提"),
        ("Nguyễn Văn An", "Nguyễn Văn An"),
        ("김민준", "김민준"),
    ],
)
def test_name_trimmed_and_collapsed(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


@pytest.mark.parametrize(
    ("decomposed", "composed"),
    [
        ("Jose\u0301", "Jos\u00e9"),
        ("Zoe\u0308 Mu\u0308ller", "Zo\u00eb M\u00fcller"),
        ("Nguye\u0302\u0303n", "Nguy\u1ec5n"),
    ],
)
def test_name_nfc(decomposed: str, composed: str) -> None:
    assert decomposed != composed
    result = normalize_name(decomposed)
    assert result == composed
    assert unicodedata.is_normalized("NFC", result)


@pytest.mark.parametrize(
    "dot",
    [
        "\u00b7",
        "\u0387",
        "\u2022",
        "\u2027",
        "\u2219",
        "\u22c5",
        "\u30fb",
        "\uff65",
        "\u16eb",
        "\u2e31",
    ],
)
def test_middle_dot_variants_unified(dot: str) -> None:
    assert normalize_name(f"阿卜杜拉{dot}买买提") == "阿卜杜拉\u00b7买买提"


def test_ascii_full_stop_is_not_a_middle_dot() -> None:
    assert reject_name("阿卜杜拉.买买提") == "contains a character that is not allowed in a name"


def test_name_length_boundaries() -> None:
    assert normalize_name("张" * 64) == "张" * 64
    assert reject_name("张" * 65) == "must be at most 64 characters"
    # 256 raw characters are looked at; padding is trimmed away.
    padded = " " * 127 + "张三" + " " * 127
    assert len(padded) == 256
    assert normalize_name(padded) == "张三"


def test_over_long_name_rejected_before_normalising(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_normalise(form: str, text: str) -> str:
        raise AssertionError("normalised an over-long name")

    # Swap the module's reference only; pytest itself relies on unicodedata.normalize.
    fake = types.SimpleNamespace(normalize=must_not_normalise, category=unicodedata.category)
    monkeypatch.setattr(identity, "unicodedata", fake)
    assert reject_name("张" * 10_000) == "must be at most 64 characters"
    # Would be short after trimming, but the raw cap comes first.
    assert reject_name("张" + " " * 255 + "三") == "must be at most 64 characters"


# --- names: rejected --------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", " ", "   ", "\u3000\t\n", "\u00a0"])
def test_empty_name(raw: str) -> None:
    assert reject_name(raw) == "is required"


INVISIBLE = "contains a control or invisible character"
NOT_ALLOWED = "contains a character that is not allowed in a name"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("张\x00三", INVISIBLE),
        ("张三\x00", INVISIBLE),
        ("张\x07三", INVISIBLE),
        ("张\x1f三", INVISIBLE),  # information separator: str.isspace() says whitespace
        ("张\x7f三", INVISIBLE),
        ("张\u200b三", INVISIBLE),  # zero-width space
        ("张\u200d三", INVISIBLE),  # zero-width joiner
        ("张\u202e三", INVISIBLE),  # right-to-left override
        ("张\ufeff三", INVISIBLE),
        ("张\ud800三", INVISIBLE),  # lone surrogate
        ("张\ue000三", INVISIBLE),  # private use
        ("张\u0378三", INVISIBLE),  # unassigned
        ("张三😀", NOT_ALLOWED),
        ("张3", NOT_ALLOWED),
        ("张\uff13", NOT_ALLOWED),  # full-width digit
        ("张\u0663", NOT_ALLOWED),  # Arabic-Indic digit
        ("<script>", NOT_ALLOWED),
        ("张<三", NOT_ALLOWED),
        ("张@三", NOT_ALLOWED),
        ("Li_Lei", NOT_ALLOWED),
        ("Li, Lei", NOT_ALLOWED),
        ("·", "must contain a letter"),
        ("- '", "must contain a letter"),
    ],
)
def test_bad_characters_rejected(raw: str, expected: str) -> None:
    assert reject_name(raw) == expected


def test_name_custom_field() -> None:
    assert reject_name("", field="new_holder_name") == "is required"


# --- name masking -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "masked"),
    [
        ("张三", "张*"),
        ("张三丰", "张**"),
        ("李", "*"),
        ("欧阳娜娜", "欧阳**"),
        ("欧阳锋", "欧阳*"),
        ("司马相如", "司马**"),
        ("诸葛亮", "诸葛*"),
        ("歐陽娜娜", "歐陽**"),
        ("欧阳", "欧*"),  # too short to be surname + given name
        ("阿卜杜拉·买买提", "阿***·***"),
        ("Li Lei", "L* ***"),
        ("Jean-Luc Picard", "J******* ******"),
        ("", ""),
    ],
)
def test_mask_name(name: str, masked: str) -> None:
    assert mask_name(name) == masked
    assert len(masked) == len(name)


def test_compound_surnames_are_two_characters() -> None:
    assert {"欧阳", "司马", "上官", "诸葛", "第五", "万俟"} <= COMPOUND_SURNAMES
    assert all(len(surname) == 2 for surname in COMPOUND_SURNAMES)
