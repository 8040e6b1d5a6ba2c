"""Typed facade over phonebind's services; the generated stubs are in ``phonebind.v1``."""

from phonebind.v1.errors_pb2 import ErrorReason

from .aio import AsyncPhonebindClient
from .client import (
    AccountState,
    CodeTarget,
    PhonebindClient,
    RebindState,
    RebindStep,
    ReviewReadiness,
    ReviewState,
    RiskDecision,
)
from .errors import ERROR_DOMAIN, PhonebindError

__all__ = [
    "ERROR_DOMAIN",
    "AccountState",
    "AsyncPhonebindClient",
    "CodeTarget",
    "ErrorReason",
    "PhonebindClient",
    "PhonebindError",
    "RebindState",
    "RebindStep",
    "ReviewReadiness",
    "ReviewState",
    "RiskDecision",
]
