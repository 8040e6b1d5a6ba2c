"""The bound on audit events of unauthenticated refusals, source by source."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from phonebind_server.domain.audit_log import StrangerWindows
from phonebind_server.rpc.interceptors import source_address

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def test_each_source_has_its_own_minute():
    windows = StrangerWindows(limit=2)
    assert [windows.admit("10.0.0.1", T0) for _ in range(3)] == [True, True, False]
    assert windows.admit("10.0.0.2", T0)  # another source, its own allowance
    assert windows.closed(T0 + timedelta(seconds=59)) == []
    assert not windows.admit("10.0.0.1", T0 + timedelta(seconds=59))
    # A new minute for the first source; its last one waits for its summary.
    assert windows.admit("10.0.0.1", T0 + timedelta(seconds=60))
    closed = windows.closed(T0 + timedelta(seconds=61))
    assert [(source, w.started, w.unrecorded) for source, w in closed] == [("10.0.0.1", T0, 2)]
    assert windows.closed(T0 + timedelta(seconds=200)) == []  # nothing left unrecorded


def test_more_sources_than_it_keeps_share_one_window(monkeypatch):
    monkeypatch.setattr(StrangerWindows, "MAX_SOURCES", 3)
    windows = StrangerWindows(limit=1)
    assert all(windows.admit(f"10.0.0.{n}", T0) for n in range(3))
    assert windows.admit("10.0.1.1", T0)  # the overflow window's one event
    assert not windows.admit("10.0.1.2", T0)
    closed = windows.closed(T0, every=True)
    assert [(s, w.unrecorded) for s, w in closed] == [(StrangerWindows.OVERFLOW, 1)]


def test_all_sources_together_get_ten_times_one_sources_events():
    windows = StrangerWindows(limit=2)
    admitted = [windows.admit(f"10.0.0.{n}", T0) for n in range(30)]
    assert admitted.count(True) == 20  # the first 20 sources; the other 10 are counted
    assert admitted[20:] == [False] * 10
    assert windows.admit("10.0.0.99", T0 + timedelta(seconds=60))  # a new minute


def test_summaries_not_written_wait_for_the_next_try_within_bounds(monkeypatch):
    monkeypatch.setattr(StrangerWindows, "MAX_SOURCES", 2)
    windows = StrangerWindows(limit=1)
    for minute in range(3):  # three minutes of one source, the store down throughout
        at = T0 + timedelta(minutes=minute)
        assert [windows.admit("10.0.0.1", at) for _ in range(3)] == [True, False, False]
        windows.unsummarised(windows.closed(at + timedelta(minutes=1)))
    # Two minutes kept as they were, the third folded into the overflow window.
    assert sorted(windows.waiting()) == [("(other sources)", 2), ("10.0.0.1", 2), ("10.0.0.1", 2)]
    kept = sorted((s, w.started, w.unrecorded) for s, w in windows.closed(T0 + timedelta(hours=1)))
    assert kept == [
        ("(other sources)", T0 + timedelta(minutes=2), 2),
        ("10.0.0.1", T0, 2),
        ("10.0.0.1", T0 + timedelta(minutes=1), 2),
    ]
    assert windows.closed(T0 + timedelta(hours=2)) == []


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("ipv4:10.0.0.7:5123", "10.0.0.7"),
        ("ipv6:%5B::1%5D:58384", "::1"),  # as gRPC writes it: percent-encoded
        ("ipv6:%5B2001:db8:1:2:aa::7%5D:5123", "2001:db8:1:2::/64"),  # a host's /64
        ("ipv6:%5B2001:db8:1:2:bb::9%5D:6000", "2001:db8:1:2::/64"),
        ("ipv6:%5B::ffff:10.0.0.7%5D:5123", "10.0.0.7"),
        ("ipv6:[fd00::7]:5123", "fd00::/64"),
        ("unix:/run/phonebind.sock", "unix"),
        ("", "unknown"),
    ],
)
def test_the_source_is_the_peer_address_without_its_port(peer, source):
    assert source_address(peer) == source
