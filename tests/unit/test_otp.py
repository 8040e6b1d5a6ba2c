"""One-time codes: every code of the configured length equally likely, leading zeros kept."""

from __future__ import annotations

from collections import Counter

import pytest

from phonebind_server.domain.errors import DomainError
from phonebind_server.domain.otp import check_code_format, new_code


def test_one_draw_over_the_whole_code_space():
    bounds: list[int] = []

    def randbelow(bound: int) -> int:
        bounds.append(bound)
        return 42

    assert new_code(6, randbelow) == "000042"
    assert bounds == [10**6]


@pytest.mark.parametrize("length", [6, 8, 10])
def test_smallest_and_largest_draws_keep_the_length(length):
    assert new_code(length, lambda bound: 0) == "0" * length
    assert new_code(length, lambda bound: bound - 1) == "9" * length


def test_codes_from_the_os_source_are_ascii_digits_spread_evenly_over_every_position():
    codes = [new_code(6) for _ in range(20_000)]
    assert all(len(code) == 6 and code.isascii() and code.isdigit() for code in codes)
    for position in range(6):
        counts = Counter(code[position] for code in codes)
        # 2000 expected per digit; a standard deviation is about 42.
        assert sorted(counts) == list("0123456789")
        assert all(1_700 < n < 2_300 for n in counts.values()), (position, counts)


def test_a_drawn_code_passes_the_format_check():
    assert check_code_format(new_code(6), 6)
    with pytest.raises(DomainError):
        check_code_format("١٢٣٤٥٦", 6)  # Arabic-Indic digits are not ASCII
