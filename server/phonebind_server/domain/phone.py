"""Phone numbers as the domain sees them: validated mobile numbers in E.164.

Raw input is screened character by character before `phonenumbers` sees it,
because `phonenumbers` quietly folds full-width and other Unicode digits into
ASCII ones; two spellings of one number must not slip past the uniqueness,
rate-limit and risk rules. Error descriptions reach operators, so they never
repeat the input.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberType

from phonebind_server.domain import cn_provinces
from phonebind_server.domain.errors import Reason, invalid

MAX_PHONE_INPUT_LENGTH = 32
"""Longest raw input looked at; anything longer is rejected before parsing."""

DEFAULT_VIRTUAL_OPERATOR_PREFIXES: tuple[str, ...] = ("162", "165", "167", "170", "171")
"""CN mobile ranges sold by virtual operators (MVNOs); DESIGN.md sends them to review."""

_ASCII_DIGITS = frozenset("0123456789")
_SEPARATORS = frozenset(" -")
_MOBILE_TYPES = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE})


@dataclass(frozen=True, slots=True)
class PhoneNumber:
    """A validated mobile number; `e164` is the one form stored and compared."""

    e164: str
    region: str

    @property
    def national(self) -> str:
        """The national significant number, e.g. "13800138000" for +8613800138000."""
        country_code = phonenumbers.country_code_for_region(self.region)
        prefix = f"+{country_code}"
        if country_code and self.e164.startswith(prefix):
            return self.e164[len(prefix) :]
        return phonenumbers.national_significant_number(phonenumbers.parse(self.e164, None))

    def masked(self) -> str:
        """The national number masked for display, logs and operators."""
        return mask_phone(self.national)

    def __repr__(self) -> str:
        # Keep full numbers out of logs and tracebacks that repr() a PhoneNumber.
        return f"PhoneNumber(masked={self.masked()!r}, region={self.region!r})"


def parse_phone(
    raw: str,
    *,
    allowed_regions: Iterable[str] = ("CN",),
    field: str = "phone",
) -> PhoneNumber:
    """Validate user input as a mobile number of an allowed region.

    Accepts E.164 ("+8613800138000"), national format of the first allowed
    region ("13800138000") and the "00" international prefix ("0086..."),
    with single ASCII spaces or hyphens between digits.
    """
    regions = tuple(region.upper() for region in allowed_regions)
    if not regions:
        raise ValueError("allowed_regions must name at least one region")

    digits = _screen(raw, field)
    if raw.startswith("+"):
        text, default_region = "+" + digits, None
    elif digits.startswith("00"):
        text, default_region = "+" + digits[2:], None
    else:
        text, default_region = digits, regions[0]

    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException:
        raise invalid(Reason.INVALID_PHONE, field, "is not a valid phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise invalid(Reason.INVALID_PHONE, field, "is not a valid phone number")
    region = phonenumbers.region_code_for_number(number)
    if region not in regions:
        raise invalid(Reason.INVALID_PHONE, field, "is from a region that is not allowed")
    if phonenumbers.number_type(number) not in _MOBILE_TYPES:
        raise invalid(Reason.INVALID_PHONE, field, "must be a mobile number")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return PhoneNumber(e164=e164, region=region)


def _screen(raw: str, field: str) -> str:
    """Check the raw shape with ASCII-only rules and return its digits."""
    if not isinstance(raw, str) or not raw:
        raise invalid(Reason.INVALID_PHONE, field, "is required")
    if len(raw) > MAX_PHONE_INPUT_LENGTH:
        raise invalid(Reason.INVALID_PHONE, field, "is too long")

    body = raw.removeprefix("+")
    digits: list[str] = []
    previous_was_digit = False
    for char in body:
        if char in _ASCII_DIGITS:
            digits.append(char)
            previous_was_digit = True
        elif char in _SEPARATORS and previous_was_digit:
            previous_was_digit = False
        elif char in _SEPARATORS:
            raise invalid(
                Reason.INVALID_PHONE, field, "may only have single spaces or hyphens between digits"
            )
        else:
            raise invalid(
                Reason.INVALID_PHONE,
                field,
                "may only contain ASCII digits, a leading '+', spaces and hyphens",
            )
    if not digits:
        raise invalid(Reason.INVALID_PHONE, field, "must contain digits")
    if not previous_was_digit:
        raise invalid(Reason.INVALID_PHONE, field, "must end with a digit")
    return "".join(digits)


def mask_phone(national: str) -> str:
    """Mask a national number so it can be shown without revealing it.

    Keeps the first 3 and last 4 digits ("138****8000"); numbers shorter than
    8 digits keep only the last 2, and 2 digits or fewer are fully masked.
    """
    length = len(national)
    if length >= 8:
        return national[:3] + "*" * (length - 7) + national[-4:]
    if length > 2:
        return "*" * (length - 2) + national[-2:]
    return "*" * length


def is_virtual_operator(
    phone: PhoneNumber,
    prefixes: Iterable[str] = DEFAULT_VIRTUAL_OPERATOR_PREFIXES,
) -> bool:
    """Whether a CN number belongs to a virtual-operator (MVNO) range."""
    return phone.region == "CN" and phone.national.startswith(tuple(prefixes))


def province_code(phone: PhoneNumber) -> str | None:
    """The GB/T 2260 province code a CN mobile range is registered in, if known.

    A risk signal only: ranges are assigned by province, but numbers roam.
    Looked up in cn_provinces (generated from phonenumbers' geocoder) rather
    than the geocoder itself, whose data for every country costs ~100 MB.
    """
    if phone.region != "CN" or len(phone.national) < 7:
        return None
    index = bisect.bisect_right(cn_provinces.STARTS, int(phone.national[:7])) - 1
    if index < 0:
        return None
    code = cn_provinces.CODES[2 * index : 2 * index + 2]
    return None if code == "00" else code
