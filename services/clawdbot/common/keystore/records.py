"""What a key is (KeyRecord), what creating or changing one asks for (KeySpec), and the
validation of both: every bound is checked here, with a 400 naming the parameter."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

import orjson

from clawdbot.common.errors import GatewayError

MAX_NAME = 100
MAX_MODELS = 64
MAX_GLOB = 200
MAX_METADATA_BYTES = 4096
MAX_BUDGET_USD = 1e6
MAX_RATE = 1_000_000_000
MAX_PARALLEL = 10_000
PERIODS = ("day", "month", "total")
MAX_STRATEGY = 64
MAX_WORKFLOWS = 64
CACHE_SCOPES = ("shared", "private", "")

FIELDS = (
    "name",
    "models",
    "budget",
    "rate_limit",
    "max_parallel",
    "expires_at",
    "metadata",
    "admin",
    "defaults",
)


def allowed(globs: Iterable[str], name: str) -> bool:
    """Whether a key's globs (models, workflows) allow `name`; none allow everything.
    Case-sensitive on every OS: model and workflow names are identifiers, not file names.
    Every service decides with this one function (adapter, router, jobs, key store)."""
    patterns = tuple(globs)
    return not patterns or any(fnmatchcase(name, glob) for glob in patterns)


class KeyNotFound(GatewayError):
    def __init__(self, key_id: str) -> None:
        super().__init__(404, f"No key with id {key_id!r}.", "invalid_request_error", "key_not_found", "id")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    prefix: str
    models: tuple[str, ...]
    budget: dict[str, Any] | None
    rate_limit: dict[str, Any] | None
    max_parallel: int | None
    expires_at: datetime | None
    metadata: dict[str, Any]
    admin: bool
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None
    # {"strategy": str, "cache": "shared" | "private" | "", "workflows": [globs]}; the store
    # always gives the full shape ("" / [] = no default). A record built elsewhere may
    # leave it {}: read it with .get.
    defaults: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """JSON-ready view for the admin API: no secret, no hash."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "models": list(self.models),
            "budget": dict(self.budget) if self.budget is not None else None,
            "rate_limit": dict(self.rate_limit) if self.rate_limit is not None else None,
            "max_parallel": self.max_parallel,
            "expires_at": _iso(self.expires_at),
            "metadata": dict(self.metadata),
            "admin": self.admin,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "revoked_at": _iso(self.revoked_at),
            "defaults": _defaults(self.defaults),
        }

    def allows_model(self, model: str) -> bool:
        return allowed(self.models, model)

    def usable(self, now: datetime) -> bool:
        """Not revoked, not expired."""
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


def _bad(param: str, message: str) -> GatewayError:
    return GatewayError.bad_request(message, param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad("name", "`name` must be a non-empty string.")
    if len(value) > MAX_NAME:
        raise _bad("name", f"`name` is longer than {MAX_NAME} characters.")
    return value


def _models(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _bad("models", "`models` must be a list of model names or globs.")
    if len(value) > MAX_MODELS:
        raise _bad("models", f"`models` has more than {MAX_MODELS} entries.")
    for glob in value:
        if not isinstance(glob, str) or not glob or len(glob) > MAX_GLOB:
            raise _bad("models", f"each of `models` must be a non-empty string of at most {MAX_GLOB} characters.")
    return tuple(value)


def _budget(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("budget", '`budget` must be an object {"usd", "period"}.')
    unknown = sorted(set(value) - {"usd", "period"})
    if unknown:
        raise _bad(f"budget.{unknown[0]}", f"`budget` has an unknown field `{unknown[0]}`.")
    usd = value.get("usd")
    if (
        not isinstance(usd, int | float)
        or isinstance(usd, bool)
        or not math.isfinite(usd)
        or usd <= 0
        or usd > MAX_BUDGET_USD
    ):
        raise _bad("budget.usd", f"`budget.usd` must be a number above 0 and at most {MAX_BUDGET_USD:g}.")
    period = value.get("period")
    if period not in PERIODS:
        raise _bad("budget.period", f"`budget.period` must be one of {', '.join(PERIODS)}.")
    return {"usd": float(usd), "period": period}


def _rate_limit(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("rate_limit", '`rate_limit` must be an object {"requests_per_minute", "tokens_per_minute"}.')
    names = ("requests_per_minute", "tokens_per_minute")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise _bad(f"rate_limit.{unknown[0]}", f"`rate_limit` has an unknown field `{unknown[0]}`.")
    limits: dict[str, Any] = {}
    for name in names:
        limit = value.get(name)
        if limit is not None and (not _is_int(limit) or limit < 1 or limit > MAX_RATE):
            raise _bad(f"rate_limit.{name}", f"`rate_limit.{name}` must be an integer from 1 to {MAX_RATE}.")
        limits[name] = limit
    # No limit at all is the same as no rate_limit: one spelling for "unlimited".
    return limits if any(v is not None for v in limits.values()) else None


def _max_parallel(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1 or value > MAX_PARALLEL:
        raise _bad("max_parallel", f"`max_parallel` must be an integer from 1 to {MAX_PARALLEL}.")
    return int(value)


def _expires_at(value: Any, now: datetime | None = None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise _bad("expires_at", "`expires_at` must be an ISO 8601 date and time.") from None
    else:
        raise _bad("expires_at", "`expires_at` must be an ISO 8601 date and time.")
    # A time without an offset is taken as UTC, the only zone the store speaks.
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if when <= (now or datetime.now(UTC)):
        raise _bad("expires_at", "`expires_at` must be in the future.")
    return when


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("metadata", "`metadata` must be a JSON object.")
    try:
        size = len(orjson.dumps(value))
    except TypeError:
        raise _bad("metadata", "`metadata` must be a JSON object.") from None
    if size > MAX_METADATA_BYTES:
        raise _bad("metadata", f"`metadata` is larger than {MAX_METADATA_BYTES} bytes serialized.")
    return dict(value)


def _defaults(value: Any) -> dict[str, Any]:
    """Always the full shape (strategy, cache, workflows), so readers need no .get chains."""
    if value is None:
        return {"strategy": "", "cache": "", "workflows": []}
    if not isinstance(value, dict):
        raise _bad("defaults", '`defaults` must be an object {"strategy", "cache", "workflows"}.')
    unknown = sorted(set(value) - {"strategy", "cache", "workflows"})
    if unknown:
        raise _bad(f"defaults.{unknown[0]}", f"`defaults` has an unknown field `{unknown[0]}`.")
    strategy = value.get("strategy")
    if strategy is None:
        strategy = ""
    if not isinstance(strategy, str) or len(strategy) > MAX_STRATEGY:
        raise _bad("defaults.strategy", f"`defaults.strategy` must be a string of at most {MAX_STRATEGY} characters.")
    cache = value.get("cache")
    if cache is None:
        cache = ""
    if cache not in CACHE_SCOPES:
        raise _bad("defaults.cache", '`defaults.cache` must be "shared", "private" or "".')
    workflows = value.get("workflows")
    if workflows is None:
        workflows = []
    if not isinstance(workflows, list | tuple):
        raise _bad("defaults.workflows", "`defaults.workflows` must be a list of workflow names or globs.")
    if len(workflows) > MAX_WORKFLOWS:
        raise _bad("defaults.workflows", f"`defaults.workflows` has more than {MAX_WORKFLOWS} entries.")
    for glob in workflows:
        if not isinstance(glob, str) or not glob or len(glob) > MAX_GLOB:
            raise _bad(
                "defaults.workflows",
                f"each of `defaults.workflows` must be a non-empty string of at most {MAX_GLOB} characters.",
            )
    return {"strategy": strategy, "cache": cache, "workflows": list(workflows)}


def _admin(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad("admin", "`admin` must be true or false.")
    return value


_VALIDATORS: dict[str, Any] = {
    "name": _name,
    "models": _models,
    "budget": _budget,
    "rate_limit": _rate_limit,
    "max_parallel": _max_parallel,
    "expires_at": _expires_at,
    "metadata": _metadata,
    "admin": _admin,
    "defaults": _defaults,
}


def _check_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise GatewayError.bad_request("The request body must be a JSON object.")
    unknown = [name for name in body if name not in _VALIDATORS]
    if unknown:
        raise _bad(str(unknown[0]), f"Unknown field `{unknown[0]}`; known: {', '.join(FIELDS)}.")
    return body


@dataclass(frozen=True)
class KeySpec:
    """What POST /v1/admin/keys carries, validated by KeySpec.parse."""

    name: str
    models: tuple[str, ...] = ()
    budget: dict[str, Any] | None = None
    rate_limit: dict[str, Any] | None = None
    max_parallel: int | None = None
    expires_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    admin: bool = False
    defaults: dict[str, Any] = field(default_factory=lambda: _defaults(None))

    @classmethod
    def parse(cls, body: dict[str, Any]) -> KeySpec:
        """Raises GatewayError 400 naming the parameter."""
        _check_body(body)
        if "name" not in body:
            raise _bad("name", "`name` is required.")
        values = {name: _VALIDATORS[name](value) for name, value in body.items()}
        return cls(**values)

    @staticmethod
    def parse_changes(body: dict[str, Any]) -> dict[str, Any]:
        """PATCH: only known fields, each validated and normalized (null clears an
        optional field). Idempotent: its own output parses to itself."""
        _check_body(body)
        return {name: _VALIDATORS[name](value) for name, value in body.items()}
