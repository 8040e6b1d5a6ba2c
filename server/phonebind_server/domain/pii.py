"""Keyed hashing and encryption of personal data.

Phone numbers are sealed with AES-256-GCM (so the service can still text them)
and indexed with an HMAC blind index (so uniqueness and lookups work without
decrypting). Names and ID numbers are only ever compared, so they are kept as
HMACs. Every key carries an id; sealed values name the key that sealed them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .model import SealedPhone
from .phone import PhoneNumber

_SEAL_VERSION = "v1"


@dataclass(frozen=True)
class Keys:
    """Secret material, from configuration. Keys are 32 bytes each."""

    index_key: bytes
    code_key: bytes
    seal_keys: dict[str, bytes]
    active_seal_key: str
    audit_key: bytes
    # The id recorded with every audit MAC made with audit_key.
    audit_key_id: str = "k1"

    @property
    def audit_keys(self) -> dict[str, bytes]:
        """The audit keys by id."""
        return {self.audit_key_id: self.audit_key}

    def __post_init__(self) -> None:
        for name, key in [
            ("index", self.index_key),
            ("code", self.code_key),
            ("audit", self.audit_key),
        ]:
            if len(key) < 32:
                raise ValueError(f"the {name} key must be at least 32 bytes")
        if self.active_seal_key not in self.seal_keys:
            raise ValueError("the active seal key id has no key")
        for key_id, key in self.seal_keys.items():
            if len(key) != 32 or ":" in key_id:
                raise ValueError(f"seal key {key_id!r} must be 32 bytes with an id without ':'")


class Vault:
    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.seal_keys.items()}

    def _mac(self, purpose: str, value: str) -> str:
        message = f"{purpose}\x00{value}".encode()
        return hmac.new(self._keys.index_key, message, hashlib.sha256).hexdigest()

    def phone_index(self, e164: str) -> str:
        return self._mac("phone", e164)

    def name_hash(self, normalized_name: str) -> str:
        return self._mac("holder_name", normalized_name)

    def id_number_hash(self, normalized_id_number: str) -> str:
        return self._mac("id_number", normalized_id_number)

    def seal_phone(self, phone: PhoneNumber) -> SealedPhone:
        return SealedPhone(
            index=self.phone_index(phone.e164), sealed=self.seal(phone.e164), masked=phone.masked()
        )

    def seal(self, plaintext: str) -> str:
        kid = self._keys.active_seal_key
        nonce = os.urandom(12)
        ciphertext = self._ciphers[kid].encrypt(nonce, plaintext.encode(), kid.encode())
        return f"{_SEAL_VERSION}:{kid}:{base64.urlsafe_b64encode(nonce + ciphertext).decode()}"

    @property
    def active_prefix(self) -> str:
        """How every value sealed under the active key begins."""
        return f"{_SEAL_VERSION}:{self._keys.active_seal_key}:"

    SEALED_PREFIX = f"{_SEAL_VERSION}:"
    """How every sealed value begins, whatever its key."""

    def reseal(self, token: str) -> str:
        """The same plaintext sealed under the active key."""
        return self.seal(self.unseal(token))

    def unseal(self, token: str) -> str:
        version, kid, payload = token.split(":", 2)
        if version != _SEAL_VERSION or kid not in self._ciphers:
            # The key id is no secret; it tells the operator which key is missing.
            raise ValueError(f"sealed with an unknown key {kid[:32]!r}")
        raw = base64.urlsafe_b64decode(payload)
        return self._ciphers[kid].decrypt(raw[:12], raw[12:], kid.encode()).decode()

    def code_mac(self, rebind_id: str, target: str, code: str) -> str:
        message = f"code\x00{rebind_id}\x00{target}\x00{code}".encode()
        return hmac.new(self._keys.code_key, message, hashlib.sha256).hexdigest()

    @staticmethod
    def same(a: str, b: str) -> bool:
        return hmac.compare_digest(a.encode(), b.encode())
