"""The health service's core: every instance's calls, its rule state and anomaly detector;
verdicts pushed to every watcher (the routers) the moment they change.

Calls arrive from telemetry (Kafka, or reported over gRPC); a tick evaluates the rules
every `tick_s` and, every `anomaly.window_s`, closes a window for the anomaly detectors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from clawdbot.common.config import HealthConfig
from clawdbot.gen.v1 import monitor_pb2
from clawdbot.health.alerts import Alert, Alerter
from clawdbot.health.anomaly import Detector, Verdict
from clawdbot.health.rules import AVAILABLE, PROBING, UNAVAILABLE, RuleState, Transition
from clawdbot.health.windows import Call, CallLog

log = logging.getLogger(__name__)

# (instance id, timeout) -> (it answered well, what went wrong)
Probe = Callable[[str, float], Awaitable[tuple[bool, str]]]

_STATUS_VALUE = {AVAILABLE: 2, PROBING: 1, UNAVAILABLE: 0}


@dataclass
class Tracked:
    """One instance as the health service knows it."""

    instance_id: str
    model: str
    task: str
    calls: CallLog
    rule: RuleState
    detector: Detector
    penalty: float = 0.0
    last_seen: float = 0.0
    # How many windows the anomaly window being closed spans (more than one while too few
    # calls came for a verdict).
    stretch: int = 1
    probes: list[dict[str, Any]] = field(default_factory=list)


class Monitor:
    def __init__(
        self,
        config: HealthConfig,
        registry: CollectorRegistry,
        alerter: Alerter,
        probe: Probe | None = None,
        state_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._alerter = alerter
        self._probe = probe
        self._state_dir = state_dir
        self._clock = clock
        self._instances: dict[str, Tracked] = {}
        self._watchers: set[asyncio.Queue[monitor_pb2.InstanceVerdicts]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.version = 0
        self._status = Gauge(
            "clawdbot_instance_status",
            "An instance's health verdict: 2 available, 1 probing, 0 unavailable.",
            ["model_instance"],
            registry=registry,
        )
        self._anomaly_score = Gauge(
            "clawdbot_anomaly_score",
            "IsolationForest score of the instance's last window (lower is more anomalous).",
            ["model_instance"],
            registry=registry,
        )
        self._anomalous = Gauge(
            "clawdbot_instance_anomalous",
            "1 while the instance behaves anomalously (and is penalised in routing).",
            ["model_instance"],
            registry=registry,
        )
        self._error_ratio = Gauge(
            "clawdbot_health_error_ratio",
            "Share of failed calls in the rule's window.",
            ["model_instance"],
            registry=registry,
        )
        self._latency_p95 = Gauge(
            "clawdbot_health_latency_p95_seconds",
            "95th percentile call latency in the rule's window.",
            ["model_instance"],
            registry=registry,
        )
        self._observed = Counter(
            "clawdbot_health_observations", "Model-call observations taken in.", ["source"], registry=registry
        )

    # --- intake ----------------------------------------------------------------------

    def _track(self, instance_id: str, model: str = "", task: str = "") -> Tracked:
        tracked = self._instances.get(instance_id)
        if tracked is None:
            rule = self._config.rule_for(instance_id)
            anomaly = self._config.anomaly
            keep_s = max(rule.window_s, anomaly.window_s * anomaly.max_stretch) * 2
            tracked = Tracked(
                instance_id,
                model,
                task,
                CallLog(keep_s),
                RuleState(instance_id, rule),
                Detector(instance_id, self._config.anomaly, self._state_dir),
            )
            self._instances[instance_id] = tracked
            self._status.labels(instance_id).set(_STATUS_VALUE[AVAILABLE])
            self._anomalous.labels(instance_id).set(0)
        return tracked

    def ingest(self, observation: dict[str, Any], source: str) -> None:
        instance_id = observation.get("instance")
        if not isinstance(instance_id, str) or not instance_id:
            return
        tracked = self._track(instance_id, str(observation.get("model", "")), str(observation.get("task", "")))
        call = Call.from_observation(observation)
        tracked.calls.add(call)
        tracked.last_seen = max(tracked.last_seen, call.at)
        self._observed.labels(source).inc()

    # --- verdicts --------------------------------------------------------------------

    def verdicts(self) -> monitor_pb2.InstanceVerdicts:
        return monitor_pb2.InstanceVerdicts(
            version=self.version,
            verdicts=[
                monitor_pb2.InstanceVerdict(
                    instance_id=t.instance_id,
                    status=t.rule.status,
                    penalty=t.penalty,
                    reason=t.rule.reason if t.rule.status != AVAILABLE else ("anomalous" if t.penalty else ""),
                )
                for t in self._instances.values()
            ],
        )

    def subscribe(self) -> asyncio.Queue[monitor_pb2.InstanceVerdicts]:
        queue: asyncio.Queue[monitor_pb2.InstanceVerdicts] = asyncio.Queue(maxsize=1)
        queue.put_nowait(self.verdicts())
        self._watchers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[monitor_pb2.InstanceVerdicts]) -> None:
        self._watchers.discard(queue)

    def _changed(self) -> None:
        """Tell every watcher; one that has not read the last update gets this one instead."""
        self.version += 1
        current = self.verdicts()
        for queue in self._watchers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(current)

    def _transition(self, tracked: Tracked, moved: Transition) -> None:
        self._status.labels(tracked.instance_id).set(_STATUS_VALUE[moved.after])
        log.warning(
            "instance status changed",
            extra={"instance": moved.instance_id, "from": moved.before, "to": moved.after, "reason": moved.reason},
        )
        stats = tracked.calls.stats(self._clock(), tracked.rule.rule.window_s).public()
        if moved.after == UNAVAILABLE and moved.before == AVAILABLE:
            self._alerter.raise_alert(
                Alert(
                    tracked.instance_id,
                    "rule",
                    "firing",
                    f"{tracked.instance_id} is unavailable: {moved.reason}",
                    stats,
                )
            )
        elif moved.after == AVAILABLE:
            self._alerter.raise_alert(
                Alert(
                    tracked.instance_id, "rule", "resolved", f"{tracked.instance_id} recovered: {moved.reason}", stats
                )
            )
        self._changed()

    # --- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        window_s = self._config.anomaly.window_s
        next_window = (self._clock() // window_s + 1) * window_s
        while True:
            await asyncio.sleep(self._config.tick_s)
            now = self._clock()
            self.evaluate(now)
            if now >= next_window:
                await self.close_window(next_window)
                next_window += window_s * max(1, int((now - next_window) // window_s) + 1)

    def evaluate(self, now: float) -> None:
        """The rules, on each instance's window (only calls since it last came back count)."""
        for tracked in list(self._instances.values()):
            rule = tracked.rule
            window = rule.rule.window_s
            if rule.status == AVAILABLE and rule.since:
                window = min(window, max(now - rule.since, 1e-3))
            stats = tracked.calls.stats(now, window)
            self._error_ratio.labels(tracked.instance_id).set(stats.error_ratio)
            if stats.latency_p95_s is not None:
                self._latency_p95.labels(tracked.instance_id).set(stats.latency_p95_s)
            moved = rule.evaluate(stats, now)
            if moved is not None:
                self._transition(tracked, moved)
            if self._probe is not None and rule.probe_due(now):
                rule.probe_in_flight = True
                self._spawn(self._run_probe(tracked))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_probe(self, tracked: Tracked) -> None:
        assert self._probe is not None
        rule = tracked.rule.rule
        ok, detail = await self._probe(tracked.instance_id, rule.probe_timeout_s)
        tracked.probes = [*tracked.probes[-9:], {"at": self._clock(), "ok": ok, "detail": detail}]
        moved = tracked.rule.probed(ok, self._clock(), detail)
        if moved is not None:
            self._transition(tracked, moved)

    async def close_window(self, end: float) -> None:
        """Score the window that ended at `end` for every instance with enough calls; for
        one with too few, the window stretches on (up to `max_stretch` windows)."""
        anomaly = self._config.anomaly
        if not anomaly.enabled:
            return
        for tracked in list(self._instances.values()):
            stats = tracked.calls.stats(self._clock(), anomaly.window_s * tracked.stretch, end=end)
            if stats.requests < anomaly.min_requests:
                tracked.stretch = tracked.stretch + 1 if tracked.stretch < anomaly.max_stretch else 1
                continue
            tracked.stretch = 1
            detector = tracked.detector
            verdict = detector.observe(stats.features())
            if verdict.score is not None:
                self._anomaly_score.labels(tracked.instance_id).set(verdict.score)
            if detector.needs_training(end):
                try:
                    await asyncio.to_thread(detector.train, detector.baseline())
                except ValueError as exc:
                    log.error("anomaly model not trained", extra={"instance": tracked.instance_id, "error": str(exc)})
            self._judge(tracked, verdict, stats.public())

    def _judge(self, tracked: Tracked, verdict: Verdict, window: dict[str, Any]) -> None:
        anomalous = verdict.anomalous
        penalised = tracked.penalty > 0
        if anomalous == penalised:
            return
        tracked.penalty = self._config.anomaly.penalty if anomalous else 0.0
        self._anomalous.labels(tracked.instance_id).set(1 if anomalous else 0)
        values = {
            **window,
            "anomaly_score": verdict.score,
            "threshold": verdict.threshold,
            "beyond_baseline": list(verdict.beyond),
        }
        if anomalous:
            summary = f"{tracked.instance_id} behaves unlike its baseline ({self._config.anomaly.consecutive} windows)"
        else:
            summary = f"{tracked.instance_id} behaves normally again"
        self._alerter.raise_alert(
            Alert(tracked.instance_id, "anomaly", "firing" if anomalous else "resolved", summary, values)
        )
        self._changed()

    # --- status ----------------------------------------------------------------------

    def status(self, detailed: bool) -> list[dict[str, Any]]:
        now = self._clock()
        described = []
        for tracked in sorted(self._instances.values(), key=lambda t: t.instance_id):
            entry: dict[str, Any] = {
                "id": tracked.instance_id,
                "model": tracked.model,
                "task": tracked.task,
                "status": tracked.rule.status,
            }
            if detailed:
                verdict = tracked.detector.last
                entry.update(
                    {
                        "reason": tracked.rule.reason,
                        "since": tracked.rule.since or None,
                        "last_seen": tracked.last_seen or None,
                        "window": tracked.calls.stats(now, tracked.rule.rule.window_s).public(),
                        "probes": tracked.probes,
                        "anomaly": {
                            "ready": verdict.ready,
                            "score": verdict.score,
                            "threshold": verdict.threshold,
                            "streak": verdict.streak,
                            "beyond_baseline": list(verdict.beyond),
                            "anomalous": tracked.penalty > 0,
                            "penalty": tracked.penalty,
                            "baseline_windows": len(tracked.detector.history),
                            "note": verdict.note,
                        },
                    }
                )
            described.append(entry)
        return described

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
