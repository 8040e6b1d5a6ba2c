"""Settings checks that need no server."""

from __future__ import annotations

import pytest

from phonebind_server.config import ConfigError, load


@pytest.mark.parametrize("connections", [0, -1])
def test_a_server_needs_at_least_one_store_connection(connections):
    with pytest.raises(ConfigError, match="store_connections must be at least 1"):
        load({"dev": True, "sms_gateway": "log", "store_connections": connections}, env={})
    settings = load({"dev": True, "sms_gateway": "log", "store_connections": 1}, env={})
    assert settings.store_connections == 1


def test_described_database_urls_carry_no_password():
    from phonebind_server.store.store import describe

    assert describe("postgresql://app:s3cret@db:5432/pb") == "postgresql://app@db:5432/pb"
    assert describe("postgresql://app@db:5432/pb?password=s3cret") == "postgresql://app@db:5432/pb"
    assert describe("sqlite:////var/lib/phonebind.db") == "sqlite:////var/lib/phonebind.db"


def test_the_store_lock_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="store_lock_timeout_seconds"):
        load({"dev": True, "store_lock_timeout_seconds": 0}, env={})
