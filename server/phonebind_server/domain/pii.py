"""Keyed hashing and encryption of personal data.

Phone numbers are sealed with AES-256-GCM (so the service can still text them)
and indexed with an HMAC blind index (so uniqueness and lookups work without
decrypting). Names and ID numbers are only ever compared, so they are kept as
HMACs. Every key carries an id; sealed values name the key that sealed them.

A sealed value is bound to its place: the AES-GCM associated data holds the
key id, the table, the column and the row's key, so a value copied into
another row (or column) does not open there. Sealed values read
"v2:<key id>:<base64 of nonce + ciphertext>"; "v1:" values, bound to the key
id only, are opened only to reseal them (migration m0014, rotate-keys).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .model import SealedPhone
from .phone import PhoneNumber

_SEAL_VERSION = "v2"
# Key ids are short and plain: they are written before every value a key makes.
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
# Sealed before values were bound to their place: associated data is the key id.
_UNBOUND_VERSION = "v1"


class SealError(ValueError):
    """A sealed value does not open: its key is not configured, or the value
    was altered or moved from another place. Names no personal data."""


class SealedColumn(NamedTuple):
    """A column that holds sealed values, and the column of its row's key."""

    table: str
    column: str
    row_key: str

    def at(self, row: str) -> SealPlace:
        return SealPlace(self.table, self.column, row)


@dataclass(frozen=True)
class SealPlace:
    """Where a sealed value is kept: table, column and the row's key."""

    table: str
    column: str
    row: str

    def associated_data(self, key_id: str) -> bytes:
        parts = ("phonebind-seal", _SEAL_VERSION, key_id, self.table, self.column, self.row)
        return "\x00".join(parts).encode()

    def __str__(self) -> str:
        # Row keys are account, rebind and message ids: no personal data.
        return f"{self.table}.{self.column} of row {self.row[:80]!r}"


# Every sealed column of the schema, with the key that names its row (a
# change's rebind_id and a message's message_id are unique, and known before
# the row is written, unlike its seq).
ACCOUNT_PHONE = SealedColumn("accounts", "phone_sealed", "account_id")
REBIND_NEW_PHONE = SealedColumn("rebinds", "new_phone_sealed", "rebind_id")
CHANGE_OLD_PHONE = SealedColumn("binding_changes", "old_phone_sealed", "rebind_id")
CHANGE_NEW_PHONE = SealedColumn("binding_changes", "new_phone_sealed", "rebind_id")
OUTBOX_TO = SealedColumn("sms_outbox", "to_sealed", "message_id")
OUTBOX_TEXT = SealedColumn("sms_outbox", "text", "message_id")
OUTBOX_PARAMS = SealedColumn("sms_outbox", "params", "message_id")  # migration 15
SEALED_COLUMNS = (
    ACCOUNT_PHONE,
    REBIND_NEW_PHONE,
    CHANGE_OLD_PHONE,
    CHANGE_NEW_PHONE,
    OUTBOX_TO,
    OUTBOX_TEXT,
    OUTBOX_PARAMS,
)


class IndexedColumn(NamedTuple):
    """A column of blind indexes, and the sealed number of the same row it is
    derived from (so that a rotation of the index key re-derives it)."""

    column: str
    sealed: SealedColumn

    @property
    def table(self) -> str:
        return self.sealed.table


# Every blind index column of the schema.
INDEXED_COLUMNS = (
    IndexedColumn("phone_index", ACCOUNT_PHONE),
    IndexedColumn("new_phone_index", REBIND_NEW_PHONE),
    IndexedColumn("old_phone_index", CHANGE_OLD_PHONE),
    IndexedColumn("new_phone_index", CHANGE_NEW_PHONE),
    IndexedColumn("to_index", OUTBOX_TO),
)

# The id of a key given by a setting that carries no ids (index_key, code_key,
# audit_key); keys given with ids (index_keys, …) take any other id.
SINGLE_KEY_ID = "k1"


@dataclass(frozen=True)
class Keys:
    """Secret material, from configuration: each purpose's keys by id, and the
    id of the one that makes new values. Keys are 32 bytes or more (seal keys
    exactly 32). Every value made with a key names the key's id, so a key
    rotates: new values use the active key, old ones stay readable with theirs."""

    index_keys: Mapping[str, bytes]
    active_index_key: str
    code_keys: Mapping[str, bytes]
    active_code_key: str
    seal_keys: dict[str, bytes]
    active_seal_key: str
    audit_keys: Mapping[str, bytes]
    active_audit_key: str

    @classmethod
    def single(
        cls,
        *,
        index_key: bytes,
        code_key: bytes,
        seal_keys: dict[str, bytes],
        active_seal_key: str,
        audit_key: bytes,
    ) -> Keys:
        """One index, code and audit key each, with the id k1."""
        return cls(
            index_keys={SINGLE_KEY_ID: index_key},
            active_index_key=SINGLE_KEY_ID,
            code_keys={SINGLE_KEY_ID: code_key},
            active_code_key=SINGLE_KEY_ID,
            seal_keys=seal_keys,
            active_seal_key=active_seal_key,
            audit_keys={SINGLE_KEY_ID: audit_key},
            active_audit_key=SINGLE_KEY_ID,
        )

    @property
    def index_key(self) -> bytes:
        """The active index key."""
        return self.index_keys[self.active_index_key]

    @property
    def code_key(self) -> bytes:
        """The active code key."""
        return self.code_keys[self.active_code_key]

    @property
    def audit_key(self) -> bytes:
        """The active audit key."""
        return self.audit_keys[self.active_audit_key]

    @property
    def audit_key_id(self) -> str:
        """The id recorded with every new audit MAC."""
        return self.active_audit_key

    def __post_init__(self) -> None:
        for name, keys, active in [
            ("index", self.index_keys, self.active_index_key),
            ("code", self.code_keys, self.active_code_key),
            ("audit", self.audit_keys, self.active_audit_key),
        ]:
            if active not in keys:
                raise ValueError(f"the active {name} key id {active[:32]!r} has no key")
            for key_id, key in keys.items():
                if len(key) < 32:
                    raise ValueError(f"the {name} key {key_id!r} must be at least 32 bytes")
                if not _KEY_ID.match(key_id):
                    raise ValueError(
                        f"the {name} key id {key_id[:32]!r} must be 1 to 16 letters, digits,"
                        " '_' or '-'"
                    )
        if self.active_seal_key not in self.seal_keys:
            raise ValueError("the active seal key id has no key")
        for key_id, key in self.seal_keys.items():
            if len(key) != 32 or ":" in key_id:
                raise ValueError(f"seal key {key_id!r} must be 32 bytes with an id without ':'")


@dataclass(frozen=True)
class KeyCheck:
    """A key's check value: HMAC-SHA256 of a fixed label naming its purpose and id.
    It tells whether a key is the one recorded, and reveals nothing of it."""

    setting: str
    purpose: str
    key_id: str
    value: str


def key_setting(purpose: str, key_id: str) -> str:
    """The setting that holds the `purpose` key `key_id` (index, code or audit):
    `<purpose>_key` holds k1, `<purpose>_keys` every other id."""
    return f"{purpose}_key" if key_id == SINGLE_KEY_ID else f"{purpose}_keys"


def _check_value(key: bytes, purpose: str, key_id: str) -> str:
    label = f"phonebind key check\x00{purpose}\x00{key_id}".encode()
    return hmac.new(key, label, hashlib.sha256).hexdigest()


def key_checks(keys: Keys) -> list[KeyCheck]:
    """The check value of every configured key, with the setting that holds it."""
    found = [
        *((key_setting("index", kid), "index", kid, key) for kid, key in keys.index_keys.items()),
        *((key_setting("code", kid), "code", kid, key) for kid, key in keys.code_keys.items()),
        *((key_setting("audit", kid), "audit", kid, key) for kid, key in keys.audit_keys.items()),
        *(("seal_keys", "seal", kid, key) for kid, key in keys.seal_keys.items()),
    ]
    return [
        KeyCheck(setting, purpose, kid, _check_value(key, purpose, kid))
        for setting, purpose, kid, key in found
    ]


class KeyMismatch(ValueError):
    """A configured key is not the one this database's data was made with."""

    def __init__(self, mismatched: list[KeyCheck]) -> None:
        self.mismatched = mismatched
        named = ", ".join(f"{c.setting} (key id {c.key_id})" for c in mismatched)
        super().__init__(
            f"refusing to start: {named} does not match the key this database was used"
            " with (its recorded key check value differs); configure the key the data"
            " was made with"
        )


class Vault:
    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.seal_keys.items()}

    # -- keyed hashes: "<key id>:<hex HMAC-SHA256>" ----------------------------------
    #
    # A blind index or a hash names the key that made it, as a prefix rather
    # than a column of its own: the value is what the unique index and every
    # lookup compare, so a copy of it (a change's old number, an outbox row)
    # carries its key id along, and no second column can disagree with it.

    def _mac(self, key_id: str, purpose: str, value: str) -> str:
        message = f"{purpose}\x00{value}".encode()
        digest = hmac.new(self._keys.index_keys[key_id], message, hashlib.sha256).hexdigest()
        return f"{key_id}:{digest}"

    def phone_index(self, e164: str) -> str:
        """The number's blind index under the active index key."""
        return self._mac(self._keys.active_index_key, "phone", e164)

    def phone_indexes(self, e164: str) -> tuple[str, ...]:
        """The number's blind index under every configured index key, in key id
        order: a lookup by all of them finds rows indexed before a rotation
        finished, and locks taken on them in this order never deadlock."""
        return tuple(self._mac(kid, "phone", e164) for kid in sorted(self._keys.index_keys))

    def same_phone(self, stored_index: str, e164: str) -> bool:
        """Whether `stored_index` (under any configured key) is `e164`'s."""
        kid = self.key_id_of(stored_index)
        if kid not in self._keys.index_keys:
            return False
        return self.same(stored_index, self._mac(kid, "phone", e164))

    @property
    def index_key_ids(self) -> frozenset[str]:
        return frozenset(self._keys.index_keys)

    @property
    def active_index_key(self) -> str:
        return self._keys.active_index_key

    def name_hash(self, normalized_name: str) -> str:
        return self._mac(self._keys.active_index_key, "holder_name", normalized_name)

    def id_number_hash(self, normalized_id_number: str) -> str:
        return self._mac(self._keys.active_index_key, "id_number", normalized_id_number)

    def identity_matches(
        self, name_hash: str, id_number_hash: str, normalized_name: str, normalized_id: str
    ) -> bool:
        """Whether the stored hashes are those of this name and ID number, each
        under the key that made it. Both are compared every time, so timing
        does not tell which failed. KeyError (naming only the key id) when a
        hash's key is not configured: it cannot be checked at all."""
        hashes = []
        for stored, purpose, value in (
            (name_hash, "holder_name", normalized_name),
            (id_number_hash, "id_number", normalized_id),
        ):
            kid = self.key_id_of(stored)
            if kid not in self._keys.index_keys:
                raise KeyError(f"an identity hash uses index key {kid[:32]!r}, not configured")
            hashes.append(self.same(stored, self._mac(kid, purpose, value)))
        return hashes[0] & hashes[1]

    def hashed_with_active_key(self, value: str) -> bool:
        return self.key_id_of(value) == self._keys.active_index_key

    @staticmethod
    def key_id_of(value: str) -> str:
        """The id of the key that made a keyed hash or index (no secret)."""
        kid, colon, _ = value.partition(":")
        return kid if colon else ""

    def seal_phone(self, phone: PhoneNumber, place: SealPlace) -> SealedPhone:
        return SealedPhone(
            index=self.phone_index(phone.e164),
            sealed=self.seal(phone.e164, place),
            masked=phone.masked(),
        )

    def move_phone(self, phone: SealedPhone, source: SealPlace, target: SealPlace) -> SealedPhone:
        """`phone`, kept at `source`, sealed anew for `target` and indexed
        under the active index key (a copy never carries an old key on)."""
        e164 = self.unseal(phone.sealed, source)
        return SealedPhone(
            index=self.phone_index(e164), sealed=self.seal(e164, target), masked=phone.masked
        )

    def seal(self, plaintext: str, place: SealPlace) -> str:
        kid = self._keys.active_seal_key
        nonce = os.urandom(12)
        ciphertext = self._ciphers[kid].encrypt(
            nonce, plaintext.encode(), place.associated_data(kid)
        )
        return f"{_SEAL_VERSION}:{kid}:{base64.urlsafe_b64encode(nonce + ciphertext).decode()}"

    @property
    def active_key(self) -> str:
        return self._keys.active_seal_key

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of the seal keys configured."""
        return frozenset(self._ciphers)

    @property
    def active_prefix(self) -> str:
        """How every value sealed under the active key begins."""
        return f"{_SEAL_VERSION}:{self._keys.active_seal_key}:"

    SEALED_PREFIXES = (f"{_SEAL_VERSION}:", f"{_UNBOUND_VERSION}:")
    """How every sealed value begins, whatever its key and version."""

    @staticmethod
    def key_id(token: str) -> str:
        """The id of the key that sealed `token` (no secret)."""
        return token.split(":", 2)[1] if token.count(":") >= 2 else ""

    def reseal(self, token: str, place: SealPlace) -> tuple[str, str]:
        """The value at `place` sealed under the active key, bound to `place`,
        and its plaintext (to check the new value against). Opens an unbound
        "v1:" value too: resealing is how such values are bound."""
        plaintext = self.unseal(token, place, unbound_too=True)
        return self.seal(plaintext, place), plaintext

    def unseal(self, token: str, place: SealPlace, *, unbound_too: bool = False) -> str:
        version, kid, payload = [*token.split(":", 2), "", ""][:3]
        versions = (_SEAL_VERSION, _UNBOUND_VERSION) if unbound_too else (_SEAL_VERSION,)
        if version not in versions:
            raise SealError(
                f"{place}: an unbound v1 value; run `phonebind-server migrate`"
                if version == _UNBOUND_VERSION
                else f"{place}: not a sealed value"
            )
        if kid not in self._ciphers:
            # The key id is no secret; it tells the operator which key is missing.
            raise SealError(f"{place}: sealed with an unknown key {kid[:32]!r}")
        associated = place.associated_data(kid) if version == _SEAL_VERSION else kid.encode()
        try:
            raw = base64.urlsafe_b64decode(payload)
            return self._ciphers[kid].decrypt(raw[:12], raw[12:], associated).decode()
        except (InvalidTag, ValueError):
            raise SealError(
                f"{place}: does not open under key {kid[:32]!r}: the value was altered or"
                " moved from another row, or the key is not the one that sealed it"
            ) from None

    def code_mac(self, rebind_id: str, target: str, code: str, key_id: str = "") -> str:
        """The code's MAC under `key_id` (default: the active code key), as
        "<key id>:<hex>"."""
        kid = key_id or self._keys.active_code_key
        message = f"code\x00{rebind_id}\x00{target}\x00{code}".encode()
        return f"{kid}:{hmac.new(self._keys.code_keys[kid], message, hashlib.sha256).hexdigest()}"

    def code_matches(self, stored_mac: str, rebind_id: str, target: str, code: str) -> bool | None:
        """Whether `code` is the one MAC'd as `stored_mac`, under the key that
        MAC'd it; None when that key is no longer configured (the code can only
        be sent anew)."""
        kid = self.key_id_of(stored_mac)
        if kid not in self._keys.code_keys:
            return None
        return self.same(stored_mac, self.code_mac(rebind_id, target, code, kid))

    @staticmethod
    def same(a: str, b: str) -> bool:
        return hmac.compare_digest(a.encode(), b.encode())
