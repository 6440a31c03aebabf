"""API-key authentication: `Authorization: Bearer <key>` on every route but health.

Authentication yields a Principal: the key's id, its role and everything the key
restricts: the models it may use, its rate limits, its budget and its defaults (routing
strategy, cache scope, the workflows it may run). Keys from CLAWDBOT_API_KEY (or the one
the runner generates) are admin keys without restrictions; keys declared under `auth.keys`
in the YAML carry the role and the restrictions given there. Virtual keys ("sk-cb-…",
made over the admin API and kept in the key store) are looked up by
adapter/virtual_keys.py, which caches them in memory.

The principal of the request being served is kept in a context variable (set by
Gateway.accept), so that every route checks the model it is asked for against the same
principal, whichever protocol brought the request.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from clawdbot.common.config import ConfigError, StaticKey
from clawdbot.common.errors import GatewayError
from clawdbot.common.keystore import allowed
from clawdbot.common.quota import RateLimits
from clawdbot.gen.v1 import router_pb2

if TYPE_CHECKING:
    from clawdbot.adapter.virtual_keys import VirtualKeys

Role = Literal["admin", "user"]
ADMIN: Role = "admin"
NO_LIMITS = RateLimits()


def key_id(key: str) -> str:
    """A stable, non-secret name for a key: safe for logs, metrics and cache scopes."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from, as far as the gateway can tell."""

    key_id: str
    role: Role
    # fnmatch globs (case-sensitive) of the models the key may ask for; () = every model.
    models: tuple[str, ...] = ()
    # Requests and tokens per minute, requests at once (the adapter admits each request).
    limits: RateLimits = NO_LIMITS
    # Spend cap in USD per period (day | month | total); no period = no budget. The router
    # holds and settles it on every model call, from meta.grant.
    budget_usd: float = 0.0
    budget_period: str = ""
    # Defaults: the routing strategy when the caller names none, the cache scope
    # ("private" | "shared" | "" = the cache's configured one), and the workflows the key
    # may run (fnmatch globs; () = every workflow).
    strategy: str = ""
    cache_scope: str = ""
    workflows: tuple[str, ...] = ()
    # A virtual key (in the key store): re-read when one of its jobs runs.
    stored: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def grant(self) -> router_pb2.KeyGrant:
        """What the key allows, as it travels with each request (RequestMeta.grant)."""
        return router_pb2.KeyGrant(
            models=self.models,
            budget_usd=self.budget_usd if self.budget_period else 0.0,
            budget_period=self.budget_period,
            stored=self.stored,
            cache_scope=self.cache_scope,
        )

    def allows_workflow(self, name: str) -> bool:
        return allowed(self.workflows, name)

    def allows_model(self, model: str) -> bool:
        """Whether the key may ask for `model` by that name. A routing name ("auto", a
        group) is a name like any other: allowed when the key allows every model or one
        of its globs matches the name itself, since what it routes to is not known yet."""
        return allowed(self.models, model)


def declared_principal(key: StaticKey, key_id: str) -> Principal:
    """The principal of a key declared in YAML, with the restrictions declared with it."""
    rate = key.rate_limit
    return Principal(
        key_id,
        key.role,
        tuple(key.models),
        RateLimits(
            requests_per_minute=rate.requests_per_minute if rate is not None else None,
            tokens_per_minute=rate.tokens_per_minute if rate is not None else None,
            max_parallel=key.max_parallel,
        ),
        budget_usd=key.budget.usd if key.budget is not None else 0.0,
        budget_period=key.budget.period if key.budget is not None else "",
        strategy=key.defaults.strategy,
        cache_scope=key.defaults.cache,
        workflows=tuple(key.defaults.workflows),
    )


# A public route's caller: nobody in particular, and no rights.
ANONYMOUS = Principal("", "user")

# The principal of the request being served (Gateway.accept sets it).
caller: ContextVar[Principal] = ContextVar("clawdbot_caller")


def require_model(model: str) -> None:
    """GatewayError 403 model_not_allowed unless the current caller may use `model`.
    Called before anything is asked of the router, the cache or the jobs service."""
    principal = caller.get(None)
    if principal is None:
        # A route that asks for a model without having authenticated: a bug, not a 403.
        raise RuntimeError("a model was asked for before the caller was authenticated")
    if not principal.allows_model(model):
        raise GatewayError.model_not_allowed(model)


def require_workflow(name: str) -> None:
    """GatewayError 403 workflow_not_allowed unless the current caller may run `name`."""
    principal = caller.get(None)
    if principal is None:
        raise RuntimeError("a workflow was asked for before the caller was authenticated")
    if not principal.allows_workflow(name):
        raise GatewayError(
            403,
            f"This API key is not allowed to use the workflow `{name}`.",
            "permission_error",
            "workflow_not_allowed",
            "name",
        )


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
        virtual: VirtualKeys | None = None,
    ) -> None:
        self._virtual = virtual
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
            add(digest, declared_principal(declared_key, "key_" + digest.hex()[:12]), where)
        if not digests:
            raise ConfigError("no API key configured: set CLAWDBOT_API_KEY (the runner makes one for you)")
        self._keys = list(digests.items())

    @staticmethod
    def _bearer(authorization: str | None) -> str:
        if not authorization:
            raise GatewayError.unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError.unauthorized("The Authorization header must be `Bearer <key>`.")
        return token.strip()

    def check(self, authorization: str | None) -> Principal:
        """The principal of a valid header with a static key; GatewayError 401 otherwise."""
        return self.check_key(self._bearer(authorization))

    def check_key(self, key: str) -> Principal:
        """A static key's principal; GatewayError 401 otherwise."""
        found = self._static(key)
        if found is None:
            raise GatewayError.unauthorized("Incorrect API key provided.")
        return found

    async def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal:
        """The principal of a static or a virtual key (given as such, or in the header);
        GatewayError 401 otherwise. A virtual key known to this replica costs no I/O."""
        key = api_key if api_key else self._bearer(authorization)
        found = self._static(key)
        if found is not None:
            return found
        if self._virtual is not None and self._virtual.may_hold(key):
            return await self._virtual.principal(key)
        raise GatewayError.unauthorized("Incorrect API key provided.")

    def _static(self, key: str) -> Principal | None:
        candidate = hashlib.sha256(key.encode()).digest()
        found: Principal | None = None
        # Compare with every key, in constant time each, so timing tells nothing.
        for digest, principal in self._keys:
            if hmac.compare_digest(candidate, digest):
                found = principal
        return found
