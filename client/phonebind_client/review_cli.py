"""phonebind-review: the reviewer's desk from a terminal.

    phonebind-review list [--ready | --waiting] [--account ID] [--state pending|approved|rejected]
    phonebind-review show REBIND_ID
    phonebind-review approve REBIND_ID [--note TEXT]
    phonebind-review reject REBIND_ID --note TEXT

The reviewer recorded is the caller the token belongs to (or, for a delegate
credential, "<caller>:<person>" with --on-behalf-of). Texts come in the
language of --language (zh-CN or en; from PHONEBIND_LANGUAGE, else zh-CN).
Everything shown is masked as the service sends it. --json prints the
responses as protobuf JSON. Exit status: 0 done, 1 refused by phonebind, 2
bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, timedelta
from typing import Any, TextIO

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from phonebind.v1 import resources_pb2, review_service_pb2

from .client import PhonebindClient
from .errors import PhonebindError

__all__ = ["main"]

_STATE = {
    v.number: v.name.removeprefix("REBIND_STATE_")
    for v in resources_pb2.RebindState.DESCRIPTOR.values
}
_STEP = {
    v.number: v.name.removeprefix("REBIND_STEP_")
    for v in resources_pb2.RebindStep.DESCRIPTOR.values
}
_DECISION = {
    v.number: v.name.removeprefix("RISK_DECISION_")
    for v in resources_pb2.RiskDecision.DESCRIPTOR.values
}
_REVIEW = {
    v.number: v.name.removeprefix("REVIEW_STATE_")
    for v in resources_pb2.ReviewState.DESCRIPTOR.values
}
_READINESS = {
    review_service_pb2.REVIEW_READINESS_READY: "ready",
    review_service_pb2.REVIEW_READINESS_WAITING_ON_CUSTOMER: "waiting on customer",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phonebind-review",
        description="List, show, approve and reject rebinds that wait for a reviewer.",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("PHONEBIND_TARGET", "127.0.0.1:50051"),
        help="HOST:PORT of the server (PHONEBIND_TARGET; default 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--language",
        choices=("zh-CN", "en"),
        default=os.environ.get("PHONEBIND_LANGUAGE") or "zh-CN",
        help="language of the texts (PHONEBIND_LANGUAGE; default zh-CN)",
    )
    parser.add_argument(
        "--on-behalf-of",
        metavar="PERSON",
        help="for a delegate credential: the person deciding, recorded as <caller>:<PERSON>",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="print responses as JSON")
    security = parser.add_argument_group("TLS and credentials")
    security.add_argument("--tls", action="store_true", help="speak TLS (default root CAs)")
    security.add_argument("--ca-file", metavar="PEM", help="trust this CA (implies --tls)")
    security.add_argument("--cert", metavar="PEM", help="client certificate chain (mutual TLS)")
    security.add_argument("--key", metavar="PEM", help="the client certificate's private key")
    security.add_argument(
        "--server-name", metavar="NAME", help="the name on the server's certificate"
    )
    security.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the bearer token from PATH (else PHONEBIND_TOKEN, if set)",
    )

    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the queue, oldest first")
    listing.add_argument("--state", choices=("pending", "approved", "rejected"), default="pending")
    ready = listing.add_mutually_exclusive_group()
    ready.add_argument(
        "--ready",
        dest="readiness",
        action="store_const",
        const="ready",
        default="any",
        help="only those whose other steps are all done",
    )
    ready.add_argument(
        "--waiting",
        dest="readiness",
        action="store_const",
        const="waiting",
        help="only those still waiting on the customer",
    )
    listing.add_argument("--account", default="", metavar="ACCOUNT_ID", help="only this account")
    listing.add_argument(
        "--limit", type=int, default=100, help="show at most this many (default 100)"
    )

    show = commands.add_parser("show", help="one review with the facts to decide it")
    show.add_argument("rebind_id")

    approve = commands.add_parser("approve", help="approve as yourself")
    approve.add_argument("rebind_id")
    approve.add_argument("--note", default="", help="why the change is acceptable (optional)")

    reject = commands.add_parser("reject", help="reject as yourself; a note is required")
    reject.add_argument("rebind_id")
    reject.add_argument("--note", required=True, help="why the change is refused")
    return parser


def _read(parser: argparse.ArgumentParser, option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        parser.error(f"{option}: cannot read {path}: {error.strerror}")


def _token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    if args.token_file:
        raw = _read(parser, "--token-file", args.token_file).decode("ascii", "replace").strip()
    else:
        raw = os.environ.get("PHONEBIND_TOKEN", "").strip()
    if raw and not all(" " < c <= "~" for c in raw):
        parser.error("the token must be one line of printable ASCII")
    return raw or None


def _client(parser: argparse.ArgumentParser, args: argparse.Namespace) -> PhonebindClient:
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    credentials = None
    if args.tls or args.ca_file or args.cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(parser, "--ca-file", args.ca_file) if args.ca_file else None,
            private_key=_read(parser, "--key", args.key) if args.key else None,
            certificate_chain=_read(parser, "--cert", args.cert) if args.cert else None,
        )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return PhonebindClient(
        args.target,
        credentials=credentials,
        options=options,
        token=_token(parser, args),
        timeout=args.timeout,
        language=args.language,
        on_behalf_of=args.on_behalf_of,
    )


# -- what a reviewer reads -------------------------------------------------------------


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(duration: duration_pb2.Duration) -> str:
    left = int(duration.ToTimedelta() // timedelta(seconds=1))
    days, left = divmod(left, 86_400)
    hours, left = divmod(left, 3600)
    minutes = left // 60
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m"


def _row(case: review_service_pb2.ReviewCase) -> str:
    rebind = case.rebind
    waiting = _age(case.waiting) if case.HasField("waiting") else "-"
    readiness = _READINESS.get(case.readiness, _REVIEW.get(rebind.review.state, "").lower())
    approvals = f"{len(rebind.review.approvals)}/{rebind.review.approvals_required}"
    return "  ".join(
        (
            f"{rebind.rebind_id:<26}",
            f"{rebind.account_id:<20}",
            f"{rebind.old_phone_masked or '-':>11} -> {rebind.new_phone_masked:<11}",
            f"{_DECISION.get(rebind.risk.decision, '?')}:{rebind.risk.score:<3}",
            f"{readiness:<19}",
            f"{waiting:>7}",
            approvals,
        )
    )


def _show(case: review_service_pb2.ReviewCase, out: TextIO) -> None:
    rebind, account = case.rebind, case.account
    lines = [
        f"rebind      {rebind.rebind_id}  ({_STATE.get(rebind.state, '?')})",
        f"account     {account.account_id}  holder {account.holder_name_masked}"
        f"  ID {account.id_number_masked}",
        f"number      {rebind.old_phone_masked or '-'} -> {rebind.new_phone_masked}"
        f"{'  (old phone lost)' if rebind.old_phone_lost else ''}",
        f"risk        {_DECISION.get(rebind.risk.decision, '?')}, score {rebind.risk.score}",
    ]
    lines += [f"  {s.code} (+{s.weight}): {s.explanation}" for s in case.signals]
    lines.append(
        f"changes     {case.changes_last_30_days} in 30 days,"
        f" {case.changes_last_365_days} in 365 days"
    )
    lines.append("steps done")
    lines += [
        f"  {_STEP.get(s.step, '?'):<15} {_time(s.complete_time)}  {s.description}"
        for s in case.steps
    ]
    outstanding = [s for s in rebind.required_steps if s not in rebind.completed_steps]
    if outstanding:
        lines.append("outstanding " + ", ".join(_STEP.get(s, "?") for s in outstanding))
    review = rebind.review
    lines.append(
        f"review      {_REVIEW.get(review.state, '?')}"
        f"  ({len(review.approvals)}/{review.approvals_required} approvals)"
        + (f"  {_READINESS[case.readiness]}" if case.readiness in _READINESS else "")
    )
    lines += [
        f"  approved by {a.reviewer} at {_time(a.approve_time)}" + (f": {a.note}" if a.note else "")
        for a in review.approvals
    ]
    if review.state == resources_pb2.REVIEW_STATE_REJECTED:
        lines.append(
            f"  rejected by {review.reviewer} at {_time(review.decide_time)}: {review.note}"
        )
    lines.append(f"started     {_time(rebind.create_time)}, expires {_time(rebind.expire_time)}")
    if case.HasField("waiting"):
        lines.append(f"waiting     {_age(case.waiting)} (since {_time(case.waiting_since)})")
    out.write("\n".join(lines) + "\n")


def _json(message: Any, out: TextIO) -> None:
    out.write(json_format.MessageToJson(message, ensure_ascii=False, indent=2) + "\n")


def run(args: argparse.Namespace, client: PhonebindClient, out: TextIO) -> None:
    if args.command == "list":
        if args.limit < 1:
            raise ValueError("--limit must be at least 1")
        cases = []
        for case in client.iter_reviews(
            state=args.state,
            readiness=args.readiness,
            account_id=args.account,
            page_size=min(args.limit, 100),
        ):
            cases.append(case)
            if len(cases) == args.limit:
                break
        if args.json:
            _json(review_service_pb2.ListReviewsResponse(reviews=cases), out)
            return
        if not cases:
            out.write("no reviews\n")
        for case in cases:
            out.write(_row(case) + "\n")
        return
    if args.command == "show":
        case = client.get_review(args.rebind_id)
    elif args.command == "approve":
        case = client.approve_rebind(args.rebind_id, note=args.note)
    else:
        case = client.reject_rebind(args.rebind_id, args.note)
    if args.json:
        _json(case, out)
    else:
        _show(case, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    client = _client(parser, args)
    try:
        run(args, client, sys.stdout)
    except PhonebindError as error:
        reason = error.reason or error.code.name
        text = error.localized_message or error.message
        sys.stderr.write(f"phonebind-review: {reason}: {text}\n")
        return 1
    except ValueError as error:
        parser.error(str(error))
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
