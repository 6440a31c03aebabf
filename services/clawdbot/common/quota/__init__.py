"""Budgets and rate limits of API keys (issue 16): see README's
"Budgets and rate limits".

- RateLimiter: requests/tokens per minute and requests in flight, admitted by the adapter
  once per client request (limits.py);
- BudgetBook: spend held before and settled after every upstream attempt, by the router
  (budget.py);
- LedgerWriter: every settled call's SpendRecord, written in batches to the key store
  (ledger.py).

Counters live in Redis (scripts.py: one atomic Lua script per operation, every key of an
API key under one hash tag); without Redis, in this process (local.py).
"""

from clawdbot.common.quota.budget import (
    USD_NANO,
    BudgetBook,
    budget_exhausted,
    period_id,
    period_start,
    to_nano,
)
from clawdbot.common.quota.connect import quota_redis, quota_redis_url
from clawdbot.common.quota.ledger import LedgerWriter, SpendRecord
from clawdbot.common.quota.limits import (
    Admission,
    RateLimiter,
    RateLimits,
    key_tag,
    openai_duration,
    ratelimit_headers,
)

__all__ = [
    "USD_NANO",
    "Admission",
    "BudgetBook",
    "LedgerWriter",
    "RateLimiter",
    "RateLimits",
    "SpendRecord",
    "budget_exhausted",
    "key_tag",
    "openai_duration",
    "period_id",
    "period_start",
    "quota_redis",
    "quota_redis_url",
    "ratelimit_headers",
    "to_nano",
]
