"""The client's ReviewService and AuditService facades (blocking and asyncio) and the
phonebind-review command, against a real server on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
from datetime import timedelta

import grpc
import pytest
from support import ID_NUMBER, NEW

from phonebind_client import (
    AsyncPhonebindClient,
    ErrorReason,
    PhonebindClient,
    PhonebindError,
    ReviewReadiness,
    ReviewState,
)

BIN = pathlib.Path(sys.executable).parent


def lost_phone(server, account_id: str, old: str, new: str, *, customer_done: bool = True):
    """A lost-phone rebind: identity done, and (customer_done) the new number's code too."""
    pb = server.api
    pb.register(account_id, old)
    rebind = pb.start(account_id, new, lost=True)
    pb.identity(account_id, rebind.rebind_id)
    if customer_done:
        pb.send_and_verify(account_id, rebind.rebind_id, NEW, new)
    return rebind.rebind_id


def test_the_blocking_facade_lists_shows_and_decides_as_the_person(server):
    ready = lost_phone(server, "rc-1", "13800138401", "13900139401")
    server.clock.advance(timedelta(minutes=1))
    waiting = lost_phone(server, "rc-2", "13800138402", "13900139402", customer_done=False)
    with PhonebindClient(server.target, language="en") as pb:
        page = pb.list_reviews(readiness="ready")
        assert [c.rebind.rebind_id for c in page.reviews] == [ready]
        assert page.reviews[0].readiness == ReviewReadiness.Value("REVIEW_READINESS_READY")
        waiting_ids = [c.rebind.rebind_id for c in pb.iter_reviews(readiness="waiting")]
        assert waiting_ids == [waiting]
        both = [c.rebind.rebind_id for c in pb.iter_reviews(page_size=1)]
        assert both == [ready, waiting]
        assert [c.rebind.rebind_id for c in pb.iter_reviews(account_id="rc-2")] == [waiting]

        case = pb.get_review(ready)
        assert case.signals[0].explanation.startswith("The user says the old phone is lost")
        assert case.rebind.old_phone_masked == "138****8401"
        # The same client in the other language, and acting for a person.
        zh = pb.with_options(language="zh-CN", on_behalf_of="alice")
        assert zh.get_review(ready).signals[0].explanation.startswith("用户表示原手机号已丢失")

        approved = zh.approve_rebind(ready, note="called back")
        assert approved.rebind.review.state == ReviewState.Value("REVIEW_STATE_APPROVED")
        assert approved.rebind.review.reviewer == "dev-anonymous:alice"
        assert approved.rebind.review.approvals[0].note == "called back"

        with pytest.raises(PhonebindError) as caught:
            pb.with_options(on_behalf_of="bob").reject_rebind(waiting, "")
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.field_violations[0][0] == "reason"
        rejected = pb.with_options(on_behalf_of="bob").reject_rebind(waiting, "no callback")
        assert rejected.rebind.review.reviewer == "dev-anonymous:bob"
        assert [c.rebind.rebind_id for c in pb.iter_reviews()] == []
        assert [c.rebind.rebind_id for c in pb.iter_reviews(state="rejected")] == [waiting]

        with pytest.raises(PhonebindError) as caught:
            zh.approve_rebind(ready)
        assert caught.value.error_reason == ErrorReason.Value("ERROR_REASON_STEP_ALREADY_DONE")

        # The decisions are in the trail under the person's name, and the chain holds.
        decided = [
            (e.action, e.caller)
            for e in pb.iter_audit_events(account_id="rc-1", page_size=2)
            if e.action.startswith("REVIEW_")
        ]
        assert decided == [("REVIEW_APPROVED", "dev-anonymous:alice")]
        only = pb.list_audit_events(rebind_id=waiting, action="REVIEW_REJECTED").events
        assert [(e.caller, e.details["reviewer"]) for e in only] == [
            ("dev-anonymous:bob", "dev-anonymous:bob")
        ]
        assert pb.verify_audit_chain(account_id="rc-1").ok

    with pytest.raises(ValueError, match="unknown readiness"):
        PhonebindClient(server.target).list_reviews(readiness="soon")


def test_the_asyncio_facade_speaks_the_same_calls(server):
    rebind_id = lost_phone(server, "rc-a", "13800138411", "13900139411")

    async def decide() -> None:
        async with AsyncPhonebindClient(server.target, on_behalf_of="carol") as pb:
            page = await pb.list_reviews(readiness="ready", account_id="rc-a")
            assert [c.rebind.rebind_id for c in page.reviews] == [rebind_id]
            listed = [c.rebind.rebind_id async for c in pb.iter_reviews(page_size=1)]
            assert listed == [rebind_id]
            case = await pb.with_options(language="en").get_review(rebind_id)
            assert case.steps[0].description.startswith("The holder name and ID number")
            approved = await pb.approve_rebind(rebind_id)
            assert approved.rebind.review.reviewer == "dev-anonymous:carol"
            actions = [e.action async for e in pb.iter_audit_events(account_id="rc-a")]
            assert actions[-1] == "REVIEW_APPROVED"
            assert (await pb.verify_audit_chain()).ok

    asyncio.run(decide())


# -- phonebind-review --------------------------------------------------------------------


def review(server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "phonebind-review"), "--target", server.target, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PHONEBIND_LANGUAGE": "en"},
    )


def test_the_review_command_lists_shows_approves_and_rejects(server):
    ready = lost_phone(server, "rc-c1", "13800138421", "13900139421")
    other = lost_phone(server, "rc-c2", "13800138422", "13900139422", customer_done=False)

    listed = review(server, "list", "--ready")
    assert listed.returncode == 0, listed.stderr
    assert ready in listed.stdout and other not in listed.stdout
    assert "138****8421 -> 139****9421" in listed.stdout
    assert "ready" in listed.stdout
    waiting = review(server, "list", "--waiting", "--account", "rc-c2")
    assert other in waiting.stdout and ready not in waiting.stdout

    shown = review(server, "show", ready)
    assert shown.returncode == 0, shown.stderr
    assert "OLD_PHONE_LOST (+35): The user says the old phone is lost" in shown.stdout
    assert "IDENTITY" in shown.stdout and "NEW_PHONE_CODE" in shown.stdout
    assert "0 in 30 days, 0 in 365 days" in shown.stdout
    in_chinese = review(server, "--language", "zh-CN", "show", ready)
    assert "用户表示原手机号已丢失" in in_chinese.stdout

    approved = review(server, "--on-behalf-of", "dave", "approve", ready, "--note", "ok")
    assert approved.returncode == 0, approved.stderr
    assert "approved by dev-anonymous:dave" in approved.stdout
    again = review(server, "--on-behalf-of", "dave", "approve", ready)
    assert again.returncode == 1
    assert "STEP_ALREADY_DONE" in again.stderr

    no_note = review(server, "reject", other)
    assert no_note.returncode == 2 and "--note" in no_note.stderr
    blank = review(server, "reject", other, "--note", " ")
    assert blank.returncode == 1 and "INVALID_ARGUMENT" in blank.stderr
    rejected = review(server, "--json", "--on-behalf-of", "erin", "reject", other, "--note", "no")
    assert rejected.returncode == 0, rejected.stderr
    decided = json.loads(rejected.stdout)["rebind"]["review"]
    assert (decided["state"], decided["reviewer"], decided["note"]) == (
        "REVIEW_STATE_REJECTED",
        "dev-anonymous:erin",
        "no",
    )
    assert review(server, "list").stdout.strip() == "no reviews"
    as_json = json.loads(review(server, "--json", "list", "--state", "approved").stdout)
    assert [c["rebind"]["rebindId"] for c in as_json["reviews"]] == [ready]

    # Nothing the command printed is a full number or ID number.
    everything = "".join(
        r.stdout + r.stderr
        for r in (listed, waiting, shown, in_chinese, approved, again, rejected, blank)
    )
    for secret in ("13800138421", "13900139421", "13800138422", "13900139422", ID_NUMBER):
        assert secret not in everything
