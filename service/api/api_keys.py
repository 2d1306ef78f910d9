"""API keys, kept only as sha256 digests and checked in constant time.

Two classes of key: full keys (``GRERANK_API_KEYS``) may call every route; read-only keys
(``GRERANK_READ_API_KEYS``) may call every route that changes nothing. A key may be configured plainly or as
``sha256:<hex digest>``; either way only the digest is kept in memory once the app is built.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable

from service.settings import DIGEST_PREFIX, Settings


class Access(enum.IntEnum):
    READ = 1
    WRITE = 2


def digest(key: str) -> bytes:
    """The sha256 digest of a configured key (plain, or already ``sha256:<hex>``)."""
    if key.startswith(DIGEST_PREFIX):
        return bytes.fromhex(key[len(DIGEST_PREFIX) :])
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, write_keys: Iterable[str] = (), read_keys: Iterable[str] = ()) -> None:
        entries = [(digest(k), Access.WRITE) for k in write_keys]
        entries += [(digest(k), Access.READ) for k in read_keys]
        self._entries = tuple(entries)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        return cls(settings.api_keys, settings.read_api_keys)

    @property
    def enabled(self) -> bool:
        """Keys are required once any key, of either class, is configured."""
        return bool(self._entries)

    def access(self, presented: str) -> Access | None:
        """The access ``presented`` grants, or None for no (or an unknown) key.

        The presented key is hashed first, so every comparison is between two 32-byte digests, and every
        configured key is compared (no early exit): the time taken says nothing about which key is close.
        """
        if not presented:
            return None
        candidate = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        granted: Access | None = None
        for stored, access in self._entries:
            if hmac.compare_digest(candidate, stored) and (granted is None or access > granted):
                granted = access
        return granted


def without_plain_keys(settings: Settings) -> Settings:
    """A copy of ``settings`` whose keys are all in ``sha256:<hex>`` form: what the app keeps."""

    def hashed(keys: list[str]) -> list[str]:
        return [DIGEST_PREFIX + digest(k).hex() for k in keys]

    return settings.model_copy(
        update={"api_keys": hashed(settings.api_keys), "read_api_keys": hashed(settings.read_api_keys)}
    )
