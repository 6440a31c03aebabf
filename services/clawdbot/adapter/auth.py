"""API-key authentication: `Authorization: Bearer <key>` on every route but health."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from clawdbot.common.config import ConfigError
from clawdbot.common.errors import GatewayError


def key_id(key: str) -> str:
    """A stable, non-secret name for a key: safe for logs, metrics and cache scopes."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


class Authenticator:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [(k.encode(), key_id(k)) for k in keys if k]
        if not self._keys:
            raise ConfigError("no API key configured: set CLAWDBOT_API_KEY (the runner makes one for you)")

    def check(self, authorization: str | None) -> str:
        """The key id for a valid header; GatewayError 401 otherwise."""
        if not authorization:
            raise GatewayError.unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError.unauthorized("The Authorization header must be `Bearer <key>`.")
        return self.check_key(token.strip())

    def check_key(self, key: str) -> str:
        candidate = key.encode()
        found = ""
        # Compare with every key, in constant time each, so timing tells nothing.
        for secret, kid in self._keys:
            if hmac.compare_digest(candidate, secret):
                found = kid
        if not found:
            raise GatewayError.unauthorized("Incorrect API key provided.")
        return found
