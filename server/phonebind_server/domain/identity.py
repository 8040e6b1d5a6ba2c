"""Identity inputs: Chinese resident ID numbers and holder names.

Both are compared (as keyed hashes) against what was recorded at account
opening, so each must have exactly one normalised spelling; anything that
could be a look-alike (full-width or other Unicode digits, invisible
characters) is rejected rather than folded. Error descriptions reach
operators, so they say what is wrong but never repeat the value.
"""

from __future__ import annotations

import datetime
import re
import unicodedata

from phonebind_server.domain.errors import DomainError, Reason, invalid

# --- ID numbers (GB 11643-1999) ---------------------------------------------

ID_NUMBER_LENGTH = 18
MAX_ID_INPUT_LENGTH = 64
"""Longest raw input looked at (18 characters plus generous padding)."""

_ASCII_DIGITS = frozenset("0123456789")
_ASCII_WHITESPACE = " \t\n\r\x0b\x0c"

PROVINCE_CODES: frozenset[str] = frozenset(
    {
        # GB/T 2260 province-level divisions.
        *("11", "12", "13", "14", "15"),
        *("21", "22", "23"),
        *("31", "32", "33", "34", "35", "36", "37"),
        *("41", "42", "43", "44", "45", "46"),
        *("50", "51", "52", "53", "54"),
        *("61", "62", "63", "64", "65"),
        "71",  # Taiwan
        *("81", "82"),  # Hong Kong, Macao
        # Not a GB/T 2260 division; kept because common validators accept it.
        "91",
    }
)
"""The first two digits an ID number may start with (GB/T 2260 province codes)."""

_EARLIEST_BIRTH_DATE = datetime.date(1900, 1, 1)
_CHECK_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK_CHARACTERS = "10X98765432"


def id_check_character(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character for the first 17 ASCII digits."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, _CHECK_WEIGHTS, strict=True))
    return _CHECK_CHARACTERS[total % 11]


def normalize_id_number(raw: str, *, today: datetime.date, field: str = "id_number") -> str:
    """Validate a resident ID number and return its canonical form (upper-case X)."""

    def fail(description: str) -> DomainError:
        return invalid(Reason.INVALID_ID_NUMBER, field, description)

    if not isinstance(raw, str) or len(raw) > MAX_ID_INPUT_LENGTH:
        raise fail("must be 18 characters")
    value = raw.strip(_ASCII_WHITESPACE)
    if not value:
        raise fail("is required")
    if len(value) != ID_NUMBER_LENGTH:
        raise fail("must be 18 characters")

    first17, check = value[:17], value[17]
    if not all(char in _ASCII_DIGITS for char in first17):
        raise fail("first 17 characters must be ASCII digits")
    if check == "x":
        check = "X"
    if check not in _ASCII_DIGITS and check != "X":
        raise fail("last character must be an ASCII digit or X")

    if first17[:2] not in PROVINCE_CODES:
        raise fail("region code is not a known province")

    try:
        birth = datetime.date(int(first17[6:10]), int(first17[10:12]), int(first17[12:14]))
    except ValueError:
        raise fail("birth date is not a real date") from None
    if birth < _EARLIEST_BIRTH_DATE:
        raise fail("birth date is before 1900")
    if birth > today:
        raise fail("birth date is in the future")

    if id_check_character(first17) != check:
        raise fail("check character does not match")
    return first17 + check


def id_province(id_number: str) -> str:
    """The province code (first two digits) of a normalised ID number."""
    return id_number[:2]


def mask_id_number(id_number: str) -> str:
    """Mask an ID number for display: first 3 and last 4 kept ("110***********002X")."""
    length = len(id_number)
    if length < 8:
        return "*" * length
    return id_number[:3] + "*" * (length - 7) + id_number[-4:]


# --- Names --------------------------------------------------------------------

MAX_NAME_INPUT_LENGTH = 256
"""Longest raw input looked at; checked before normalising."""
MAX_NAME_LENGTH = 64

MIDDLE_DOT = "\u00b7"

# Dots people (and input methods) type between the parts of a transliterated
# name, e.g. "阿卜杜拉·买买提"; ASCII "." is deliberately not among them.
_MIDDLE_DOT_VARIANTS = (
    "\u00b7",  # MIDDLE DOT
    "\u0387",  # GREEK ANO TELEIA
    "\u16eb",  # RUNIC SINGLE PUNCTUATION
    "\u2022",  # BULLET
    "\u2027",  # HYPHENATION POINT
    "\u2219",  # BULLET OPERATOR
    "\u22c5",  # DOT OPERATOR
    "\u2e31",  # WORD SEPARATOR MIDDLE DOT
    "\u30fb",  # KATAKANA MIDDLE DOT
    "\uff65",  # HALFWIDTH KATAKANA MIDDLE DOT
)
_UNIFY_DOTS = str.maketrans(dict.fromkeys(_MIDDLE_DOT_VARIANTS, MIDDLE_DOT))

# What str.isspace() calls whitespace, minus the ASCII information separators
# U+001C..U+001F, which are control characters and rejected as such.
_NAME_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WHITESPACE_RUN = re.compile("[" + re.escape(_NAME_WHITESPACE) + "]+")
_NAME_PUNCTUATION = frozenset({MIDDLE_DOT, " ", "'", "-"})


def normalize_name(raw: str, *, field: str = "holder_name") -> str:
    """Return the one canonical spelling of a holder name, or reject it."""

    def fail(description: str) -> DomainError:
        return invalid(Reason.INVALID_ARGUMENT, field, description)

    if not isinstance(raw, str):
        raise fail("is required")
    if len(raw) > MAX_NAME_INPUT_LENGTH:
        raise fail(f"must be at most {MAX_NAME_LENGTH} characters")

    name = unicodedata.normalize("NFC", raw)
    name = _WHITESPACE_RUN.sub(" ", name).strip(" ")
    name = name.translate(_UNIFY_DOTS)

    if not name:
        raise fail("is required")
    if len(name) > MAX_NAME_LENGTH:
        raise fail(f"must be at most {MAX_NAME_LENGTH} characters")
    has_letter = False
    for char in name:
        category = unicodedata.category(char)
        if category.startswith("C"):
            raise fail("contains a control or invisible character")
        if category.startswith("L"):
            has_letter = True
        elif not category.startswith("M") and char not in _NAME_PUNCTUATION:
            raise fail("contains a character that is not allowed in a name")
    if not has_letter:
        raise fail("must contain a letter")
    return name


COMPOUND_SURNAMES: frozenset[str] = frozenset(
    {
        # Simplified forms.
        *("欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙"),
        *("宇文", "司徒", "夏侯", "轩辕", "令狐", "端木", "西门", "南宫", "独孤", "澹台"),
        *("公冶", "宗政", "濮阳", "淳于", "单于", "太叔", "申屠", "仲孙", "钟离", "闻人"),
        *("万俟", "赫连", "呼延", "拓跋", "百里", "东郭", "南门", "羊舌", "微生", "梁丘"),
        *("左丘", "第五"),
        # Traditional forms where they differ.
        *("歐陽", "司馬", "諸葛", "東方", "尉遲", "公孫", "長孫", "軒轅", "西門", "南宮"),
        *("獨孤", "澹臺", "濮陽", "單于", "仲孫", "鍾離", "聞人", "萬俟", "赫連", "東郭"),
        "南門",
    }
)
"""Two-character Chinese surnames, kept whole when masking a name."""


def mask_name(name: str) -> str:
    """Mask a normalised name, keeping only the surname (or first letter) readable.

    "张三" -> "张*", "欧阳娜娜" -> "欧阳**", "阿卜杜拉·买买提" -> "阿***·***",
    "Li Lei" -> "L* ***"; a one-character name becomes "*".
    """
    if len(name) <= 1:
        return "*" * len(name)
    keep = 2 if len(name) > 2 and name[:2] in COMPOUND_SURNAMES else 1
    masked_rest = "".join(char if char in (" ", MIDDLE_DOT) else "*" for char in name[keep:])
    return name[:keep] + masked_rest
