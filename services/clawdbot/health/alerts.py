"""Alerts: a JSON POST to the configured webhook, a structured log line and a metric.

An alert fires when a condition starts (an instance taken out of rotation, an anomaly) and
once more when it ends (recovered); never again while it lasts. Webhook deliveries are
retried briefly in the background and never hold up the rules. They go through the guarded
client (public addresses only, plus `health.alert_allow`; no redirects), and the webhook's
URL is logged as scheme://host:port only: Slack-style hooks carry their secret in the path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from clawdbot.common.guarded_http import GuardedHttpClient, OutboundFailed, OutboundRefused
from clawdbot.common.retry import RetryPolicy
from clawdbot.common.url_policy import AddressPolicy, redact_url

log = logging.getLogger(__name__)

# A webhook that is restarting gets three tries over about two seconds.
DELIVERY_RETRY = RetryPolicy(max_attempts=3, base_s=0.5)


@dataclass(frozen=True)
class Alert:
    instance: str
    kind: str  # rule | anomaly
    state: str  # firing | resolved
    summary: str
    values: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def key(self) -> tuple[str, str]:
        return (self.instance, self.kind)


class Alerter:
    def __init__(self, webhook: str, registry: CollectorRegistry, allow: Iterable[str] = ()) -> None:
        self._webhook = webhook
        self._firing: set[tuple[str, str]] = set()
        self._client = GuardedHttpClient(AddressPolicy.from_allowlist(allow))
        self._deliveries: set[asyncio.Task[None]] = set()
        self.sent = Counter(
            "clawdbot_health_alerts",
            "Alerts raised (firing) and cleared (resolved), by instance and kind.",
            ["model_instance", "kind", "state"],
            registry=registry,
        )
        self.failed_deliveries = Counter(
            "clawdbot_health_alert_delivery_failures", "Webhook deliveries given up on.", registry=registry
        )

    def firing(self) -> list[tuple[str, str]]:
        return sorted(self._firing)

    def raise_alert(self, alert: Alert) -> bool:
        """Send it unless it repeats what is already known; True when sent."""
        key = alert.key()
        if alert.state == "firing":
            if key in self._firing:
                return False
            self._firing.add(key)
        else:
            if key not in self._firing:
                return False
            self._firing.discard(key)
        self.sent.labels(alert.instance, alert.kind, alert.state).inc()
        log.warning(
            "alert",
            extra={"alert": {"instance": alert.instance, "kind": alert.kind, "state": alert.state}, **asdict(alert)},
        )
        if self._webhook:
            task = asyncio.create_task(self._deliver(alert))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        return True

    async def _deliver(self, alert: Alert) -> None:
        # json, as aiohttp's json= did: the detector's values may be numpy float subclasses.
        body = json.dumps(asdict(alert)).encode()
        headers = {"content-type": "application/json"}
        for attempt in range(1, DELIVERY_RETRY.max_attempts + 1):
            try:
                response = await self._client.post(self._webhook, body, headers)
            except OutboundRefused as exc:
                problem = f"refused: {exc}"
                break  # the policy will say the same next time
            except OutboundFailed as exc:
                problem = str(exc)
            else:
                if response.status < 300:
                    return
                problem = f"HTTP {response.status}"
            if DELIVERY_RETRY.may_retry(attempt):
                await asyncio.sleep(DELIVERY_RETRY.backoff(attempt))
        self.failed_deliveries.inc()
        log.error("alert webhook delivery failed", extra={"webhook": redact_url(self._webhook), "error": problem})

    async def close(self) -> None:
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=5)
        await self._client.close()
