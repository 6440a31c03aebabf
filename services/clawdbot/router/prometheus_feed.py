"""Latency and request rate per instance, as Prometheus sees them across every router.

One router only measures the calls it makes itself; with several replicas behind Envoy,
Prometheus (scraping all of them) knows more. When `model_router.prometheus_url` is set,
the router polls it and an instance this router has not measured yet is scored with the
fleet's figure instead of the cold prior. A failing Prometheus is logged and ignored: the
in-process measurements keep routing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp

log = logging.getLogger(__name__)

_DURATION = "gen_ai_client_operation_duration_seconds"
LATENCY_QUERY = (
    f"sum by (model_instance) (rate({_DURATION}_sum[1m])) / sum by (model_instance) (rate({_DURATION}_count[1m]))"
)
QPS_QUERY = f"sum by (model_instance) (rate({_DURATION}_count[1m]))"


@dataclass(frozen=True)
class FleetView:
    latency_s: dict[str, float]
    qps: dict[str, float]


class PrometheusFeed:
    def __init__(self, url: str, refresh_s: float) -> None:
        self._url = url.rstrip("/")
        self._refresh_s = refresh_s
        self.view = FleetView({}, {})

    async def _query(self, session: aiohttp.ClientSession, promql: str) -> dict[str, float]:
        async with session.get(
            f"{self._url}/api/v1/query", params={"query": promql}, timeout=aiohttp.ClientTimeout(total=5)
        ) as resp:
            payload = await resp.json()
        if payload.get("status") != "success":
            raise ValueError(payload.get("error") or "query failed")
        values: dict[str, float] = {}
        for series in payload["data"]["result"]:
            instance = series["metric"].get("model_instance")
            value = float(series["value"][1])
            if instance and value == value:  # NaN when no calls in the window
                values[instance] = value
        return values

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        latency, qps = await asyncio.gather(self._query(session, LATENCY_QUERY), self._query(session, QPS_QUERY))
        self.view = FleetView(latency, qps)

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.refresh(session)
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                    log.warning("prometheus query failed; using local measurements", extra={"error": str(exc)})
                await asyncio.sleep(self._refresh_s)
