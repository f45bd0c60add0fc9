"""Bearer-token identities. Tokens are kept only as sha256 digests and compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from approvals.config import Principal, sha256_hex


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer …` header, or None (also when it is not UTF-8)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token and is_utf8(token) else None


def is_utf8(text: str) -> bool:
    """Whether `text` came from valid UTF-8: aiohttp keeps other header bytes as lone surrogates,
    which no token can contain and which cannot be hashed."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class TokenIndex:
    """Finds the principal a presented token belongs to, without leaking which digest matched when."""

    def __init__(self, principals: Iterable[Principal]) -> None:
        self._principals = tuple(p for p in principals if p.token_sha256)

    def find(self, token: str | None) -> Principal | None:
        if not token or not is_utf8(token):
            return None
        digest = sha256_hex(token).encode()
        found: Principal | None = None
        # Compare against every digest, no early exit: the time taken does not depend on which
        # (or whether any) principal matched.
        for principal in self._principals:
            if hmac.compare_digest(digest, principal.token_sha256.encode()):
                found = principal
        return found
