"""Settings checks that need no server."""

from __future__ import annotations

import pytest

from phonebind_server.config import ConfigError, load


@pytest.mark.parametrize("threads", [0, -1])
def test_a_server_needs_at_least_one_rpc_thread(threads):
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        load({"dev": True, "sms_gateway": "log", "threads": threads}, env={})
    assert load({"dev": True, "sms_gateway": "log", "threads": 1}, env={}).threads == 1
