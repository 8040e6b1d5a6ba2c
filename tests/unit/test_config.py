"""Settings that are derived rather than given."""

from __future__ import annotations

import pytest

from phonebind_server.config import ConfigError, load


def settings(**flags):
    return load({"dev": True, "sms_gateway": "log", **flags}, env={})


@pytest.mark.parametrize(
    ("url", "threads"),
    [
        ("sqlite:///phonebind.db", 2),
        ("postgresql://db/phonebind", 8),
        ("postgres://db/phonebind", 8),
    ],
)
def test_rpc_threads_are_sized_for_the_database_unless_given(url, threads):
    assert settings(database_url=url).rpc_threads() == threads
    assert settings(database_url=url, threads=5).rpc_threads() == 5


def test_negative_threads_are_refused():
    with pytest.raises(ConfigError, match="threads"):
        settings(threads=-1)
