"""API-key authentication: `Authorization: Bearer <key>` on every route but health.

Authentication yields a Principal: the key's id and its role. Keys from CLAWDBOT_API_KEY
(or the one the runner generates) are admin keys; keys declared under `auth.keys` in the
YAML carry the role given there. Admin routes ask for the admin role, so the virtual keys
a later release keeps in SQL only have to produce a Principal to fit in.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from clawdbot.common.config import ConfigError, StaticKey
from clawdbot.common.errors import GatewayError

Role = Literal["admin", "user"]
ADMIN: Role = "admin"


def key_id(key: str) -> str:
    """A stable, non-secret name for a key: safe for logs, metrics and cache scopes."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from, as far as the gateway can tell."""

    key_id: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


# A public route's caller: nobody in particular, and no rights.
ANONYMOUS = Principal("", "user")


def forbidden() -> GatewayError:
    return GatewayError(
        403,
        "This API key is not allowed to use admin routes; use an admin key.",
        "permission_error",
        "insufficient_permissions",
    )


class Authenticator:
    def __init__(
        self,
        keys: Iterable[str],
        declared: Iterable[StaticKey] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        # Keys are kept as SHA-256 digests: a hashed key in YAML and one from the
        # environment are compared the same way, and the digests are all one length.
        digests: dict[bytes, Principal] = {}

        def add(digest: bytes, principal: Principal, where: str) -> None:
            if digest in digests:
                raise ConfigError(f"{where}: the same API key is configured twice")
            digests[digest] = principal

        for key in keys:
            if key:
                digest = hashlib.sha256(key.encode()).digest()
                add(digest, Principal(key_id(key), ADMIN), "CLAWDBOT_API_KEY")
        for declared_key in declared:
            where = f"auth.keys[{declared_key.name}]"
            if declared_key.key_env is not None:
                secret = env.get(declared_key.key_env, "").strip()
                if not secret:
                    raise ConfigError(f"{where}: the variable {declared_key.key_env} that holds the key is not set")
                digest = hashlib.sha256(secret.encode()).digest()
            else:
                digest = bytes.fromhex(declared_key.sha256 or "")
            add(digest, Principal("key_" + digest.hex()[:12], declared_key.role), where)
        if not digests:
            raise ConfigError("no API key configured: set CLAWDBOT_API_KEY (the runner makes one for you)")
        self._keys = list(digests.items())

    def check(self, authorization: str | None) -> Principal:
        """The principal of a valid header; GatewayError 401 otherwise."""
        if not authorization:
            raise GatewayError.unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError.unauthorized("The Authorization header must be `Bearer <key>`.")
        return self.check_key(token.strip())

    def check_key(self, key: str) -> Principal:
        candidate = hashlib.sha256(key.encode()).digest()
        found: Principal | None = None
        # Compare with every key, in constant time each, so timing tells nothing.
        for digest, principal in self._keys:
            if hmac.compare_digest(candidate, digest):
                found = principal
        if found is None:
            raise GatewayError.unauthorized("Incorrect API key provided.")
        return found
