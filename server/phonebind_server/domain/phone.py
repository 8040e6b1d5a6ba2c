"""Phone numbers as the domain sees them: validated mobile numbers in E.164.

Raw input is screened character by character before `phonenumbers` sees it,
because `phonenumbers` quietly folds full-width and other Unicode digits into
ASCII ones; two spellings of one number must not slip past the uniqueness,
rate-limit and risk rules. Error descriptions reach operators, so they never
repeat the input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberType, geocoder

from phonebind_server.domain.errors import Reason, invalid

MAX_PHONE_INPUT_LENGTH = 32
"""Longest raw input looked at; anything longer is rejected before parsing."""

DEFAULT_VIRTUAL_OPERATOR_PREFIXES: tuple[str, ...] = ("162", "165", "167", "170", "171")
"""CN mobile ranges sold by virtual operators (MVNOs); DESIGN.md sends them to review."""

_ASCII_DIGITS = frozenset("0123456789")
_SEPARATORS = frozenset(" -")
_MOBILE_TYPES = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE})

# Province-level divisions as `geocoder` names them in Chinese: the data uses
# both full names ("广东省") and short ones ("广西南宁市", "内蒙古赤峰市", "天津"),
# so match on the short name and answer with the full one.
_CN_PROVINCES: tuple[tuple[str, str], ...] = (
    ("北京", "北京市"),
    ("天津", "天津市"),
    ("河北", "河北省"),
    ("山西", "山西省"),
    ("内蒙古", "内蒙古自治区"),
    ("辽宁", "辽宁省"),
    ("吉林", "吉林省"),
    ("黑龙江", "黑龙江省"),
    ("上海", "上海市"),
    ("江苏", "江苏省"),
    ("浙江", "浙江省"),
    ("安徽", "安徽省"),
    ("福建", "福建省"),
    ("江西", "江西省"),
    ("山东", "山东省"),
    ("河南", "河南省"),
    ("湖北", "湖北省"),
    ("湖南", "湖南省"),
    ("广东", "广东省"),
    ("广西", "广西壮族自治区"),
    ("海南", "海南省"),
    ("重庆", "重庆市"),
    ("四川", "四川省"),
    ("贵州", "贵州省"),
    ("云南", "云南省"),
    ("西藏", "西藏自治区"),
    ("陕西", "陕西省"),
    ("甘肃", "甘肃省"),
    ("青海", "青海省"),
    ("宁夏", "宁夏回族自治区"),
    ("新疆", "新疆维吾尔自治区"),
)


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


def province_of(phone: PhoneNumber) -> str | None:
    """The province-level division a CN mobile range is registered in, if known.

    A risk signal only: ranges are assigned by province, but numbers roam.
    """
    if phone.region != "CN":
        return None
    try:
        number = phonenumbers.parse(phone.e164, None)
    except phonenumbers.NumberParseException:
        return None
    description = geocoder.description_for_number(number, "zh")
    for short_name, full_name in _CN_PROVINCES:
        if description.startswith(short_name):
            return full_name
    return None
