"""Settings checks that need no server."""

from __future__ import annotations

import pytest

from phonebind_server.config import ConfigError, load


@pytest.mark.parametrize("threads", [0, -1])
def test_a_server_needs_at_least_one_rpc_thread(threads):
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        load({"dev": True, "sms_gateway": "log", "threads": threads}, env={})
    assert load({"dev": True, "sms_gateway": "log", "threads": 1}, env={}).threads == 1


def test_described_database_urls_carry_no_password():
    from phonebind_server.store.db import describe

    assert describe("postgresql://app:s3cret@db:5432/pb") == "postgresql://app@db:5432/pb"
    assert describe("postgresql://app@db:5432/pb?password=s3cret") == "postgresql://app@db:5432/pb"
    assert describe("sqlite:////var/lib/phonebind.db") == "sqlite:////var/lib/phonebind.db"


def test_the_store_lock_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="store_lock_timeout_seconds"):
        load({"dev": True, "store_lock_timeout_seconds": 0}, env={})
