"""Callbacks: the finished job POSTed to the URL its owner gave, signed so the receiver can
check it came from this gateway: `x-clawdbot-signature: sha256=<hex HMAC-SHA256(secret, body)>`.

Delivery is off the consumer's critical path: a finished job is handed to a bounded queue
and the consumer moves on; a few workers of the queue's own POST through the guarded client
(common/guarded_http.py: public addresses only unless `jobs.callback_allow` says otherwise,
checked at connect time; no redirects; each attempt bounded in time). A destination
(scheme://host:port) has at most `per_destination` deliveries in flight, so a receiver
that hangs holds that many workers for one attempt's timeout, never all of them; retries
wait outside the workers. A full queue drops the callback, loudly, rather than grow.

A callback is retried here (nothing sits under a webhook to retry it): a failed connection,
a timeout or a retryable status (common/retry.py), `attempts` times in all, with the mesh's
one backoff (exponential, full jitter) between them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from clawdbot.common.config import ConfigError, JobsConfig
from clawdbot.common.guarded_http import GuardedHttpClient, OutboundFailed, OutboundRefused
from clawdbot.common.retry import RetryPolicy, retryable_http
from clawdbot.common.url_policy import AddressPolicy, redact_url
from clawdbot.jobs.records import Job

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-clawdbot-signature"
ATTEMPTS = 3
BACKOFF_S = 0.5
WORKERS = 8
PER_DESTINATION = 2
MAX_PENDING = 10_000


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def callback_secret(config: JobsConfig, env: Mapping[str, str] | None = None) -> bytes:
    """The signing secret; a process that delivers callbacks does not start without one
    (an empty key would make every signature forgeable)."""
    value = (os.environ if env is None else env).get(config.callback_secret_env, "")
    if not value.strip():
        raise ConfigError(
            f"job callbacks are signed with the secret in ${config.callback_secret_env}, which is not set: "
            "set it (the runner generates one into its state directory when it is unset)"
        )
    return value.encode()


@dataclass
class _Delivery:
    job_id: str
    url: str
    body: bytes
    destination: str  # the URL redacted: what logs show, and what shares a per-destination cap
    attempt: int = 0

    def fields(self) -> dict[str, str]:
        return {"job": self.job_id, "callback": self.destination}


class CallbackDelivery:
    def __init__(
        self,
        client: GuardedHttpClient,
        secret: bytes,
        *,
        workers: int = WORKERS,
        per_destination: int = PER_DESTINATION,
        max_pending: int = MAX_PENDING,
        attempts: int = ATTEMPTS,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        if not secret:
            raise ConfigError("job callbacks need a non-empty signing secret")
        self._client = client
        self._secret = secret
        self._workers_wanted = workers
        self._per_destination = per_destination
        self._max_pending = max_pending
        self._policy = RetryPolicy(attempts, backoff_s)
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue()
        self._parked: defaultdict[str, deque[_Delivery]] = defaultdict(deque)
        self._busy: defaultdict[str, int] = defaultdict(int)
        # Deliveries waiting to be tried again, by id(delivery).
        self._retries: dict[int, asyncio.TimerHandle] = {}
        self._workers: list[asyncio.Task[None]] = []
        # Accepted and not yet delivered or given up on: queued, parked, in flight, waiting to retry.
        self.pending = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    def from_config(cls, config: JobsConfig) -> CallbackDelivery:
        """Raises ConfigError without a secret, or with a bad allowlist."""
        secret = callback_secret(config)
        try:
            policy = AddressPolicy.from_allowlist(config.callback_allow)
        except ValueError as exc:
            raise ConfigError(f"jobs.callback_allow: {exc}") from exc
        return cls(GuardedHttpClient(policy), secret)

    def submit(self, job: Job) -> bool:
        """Queue the job's callback (never waits); False when the queue is full."""
        if self.pending >= self._max_pending:
            log.error(
                "job callback dropped: delivery queue full",
                extra={"job": job.id, "callback": redact_url(job.callback_url), "pending": self.pending},
            )
            return False
        if not self._workers:
            self._workers = [asyncio.create_task(self._work()) for _ in range(self._workers_wanted)]
        self.pending += 1
        self._idle.clear()
        body = orjson.dumps(job.public())
        self._queue.put_nowait(_Delivery(job.id, job.callback_url, body, redact_url(job.callback_url)))
        return True

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            destination = delivery.destination
            if self._busy[destination] >= self._per_destination:
                # This receiver already has its share of workers: wait for one of them.
                self._parked[destination].append(delivery)
                continue
            self._busy[destination] += 1
            try:
                await self._attempt(delivery)
            finally:
                self._busy[destination] -= 1
                parked = self._parked.get(destination)
                if parked:
                    self._queue.put_nowait(parked.popleft())
                if not parked:
                    self._parked.pop(destination, None)
                if not self._busy[destination]:
                    del self._busy[destination]

    async def _attempt(self, delivery: _Delivery) -> None:
        delivery.attempt += 1
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, delivery.body),
            "x-clawdbot-job-id": delivery.job_id,
        }
        retryable = False
        try:
            response = await self._client.post(delivery.url, delivery.body, headers)
        except OutboundRefused as exc:
            reason = f"refused: {exc}"
        except OutboundFailed as exc:
            reason, retryable = str(exc), exc.retryable
        else:
            if response.status < 300:
                log.info(
                    "job callback delivered",
                    extra={**delivery.fields(), "attempt": delivery.attempt},
                )
                self._done()
                return
            reason = f"HTTP {response.status}"
            # The receiver's own fault or overload may pass; a 4xx says it will not take it.
            retryable = retryable_http(response.status)
        if retryable and self._policy.may_retry(delivery.attempt):
            log.warning(
                "job callback attempt failed; retrying",
                extra={**delivery.fields(), "attempt": delivery.attempt, "error": reason},
            )
            delay = self._policy.backoff(delivery.attempt)
            self._retries[id(delivery)] = asyncio.get_running_loop().call_later(delay, self._retry, delivery)
            return
        log.error(
            "job callback failed",
            extra={**delivery.fields(), "attempts": delivery.attempt, "error": reason},
        )
        self._done()

    def _retry(self, delivery: _Delivery) -> None:
        self._retries.pop(id(delivery), None)
        self._queue.put_nowait(delivery)

    def _done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self._idle.set()

    async def close(self, grace_s: float = 5.0) -> None:
        """Give deliveries under way `grace_s` to finish, then stop; what is left is logged."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.warning("job callbacks not delivered before shutdown", extra={"pending": self.pending})
        for handle in self._retries.values():
            handle.cancel()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await self._client.close()
