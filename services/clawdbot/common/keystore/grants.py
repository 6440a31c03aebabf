"""A key's restrictions as they travel with its requests (router_pb2.KeyGrant).

The adapter fills `meta.grant` from the caller's key; the jobs service rebuilds it from
the key's current record when a job runs. Both build it here so a virtual key and a key
declared in YAML carry the same fields the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clawdbot.common.keystore.records import KeyRecord
from clawdbot.gen.v1 import router_pb2

if TYPE_CHECKING:
    from clawdbot.common.config import StaticKey


def grant_of(record: KeyRecord) -> router_pb2.KeyGrant:
    """The grant of a stored (virtual) key: the jobs service re-reads such a key when a
    job runs (stored=True)."""
    grant = router_pb2.KeyGrant(models=list(record.models), stored=True)
    if record.budget is not None:
        grant.budget_usd = float(record.budget["usd"])
        grant.budget_period = str(record.budget["period"])
    grant.cache_scope = str((record.defaults or {}).get("cache") or "")
    return grant


def grant_of_static(key: StaticKey) -> router_pb2.KeyGrant:
    """The grant of a key declared in YAML: nothing to re-read later (stored=False)."""
    grant = router_pb2.KeyGrant(models=list(key.models), stored=False)
    if key.budget is not None:
        grant.budget_usd = float(key.budget.usd)
        grant.budget_period = key.budget.period
    grant.cache_scope = key.defaults.cache
    return grant
