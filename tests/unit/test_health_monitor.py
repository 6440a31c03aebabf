"""The health service's core with a controlled clock: windows, the threshold rule with
its probes, verdicts pushed to watchers, de-duplicated alerts, and the IsolationForest
detector on simulated windows (the end-to-end tests drive the real thing with traffic)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from clawdbot.common.config import AnomalyConfig, HealthConfig
from clawdbot.health.alerts import Alert, Alerter
from clawdbot.health.anomaly import Detector
from clawdbot.health.monitor import Monitor
from clawdbot.health.windows import FEATURE_NAMES, Call, CallLog, WindowStats


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def observation(instance: str, at: float, ok: bool = True, latency: float = 0.05) -> dict[str, Any]:
    return {
        "instance": instance,
        "model": "m",
        "task": "chat",
        "started_at": at - latency,
        "latency_s": latency,
        "status": "ok" if ok else "server_error",
        "output_tokens": 10,
    }


def test_a_window_counts_rates_errors_and_percentiles() -> None:
    log = CallLog(keep_s=60)
    for i in range(100):
        log.add(Call(at=100 + i * 0.1, failed=i % 4 == 0, latency_s=(i + 1) / 1000, ttft_s=None, output_tokens=5))
    stats = log.stats(now=109.95, window_s=10)
    assert stats.requests == 100 and stats.errors == 25 and stats.error_ratio == 0.25
    assert stats.rate == 10
    # Percentiles from logarithmic bins: never below the truth, at most a bin (9%) above.
    assert stats.latency_p50_s is not None and 0.05 <= stats.latency_p50_s <= 0.05 * 1.1
    assert stats.latency_p95_s is not None and 0.095 <= stats.latency_p95_s <= 0.095 * 1.1
    # Client errors are the request's fault, not the instance's.
    assert not Call.from_observation({"status": "client_error"}).failed
    assert Call.from_observation({"status": "timeout"}).failed


@pytest.mark.asyncio
async def test_errors_take_an_instance_out_and_probes_bring_it_back() -> None:
    clock = Clock()
    probes: list[str] = []
    healthy = {"value": False}

    async def probe(instance_id: str, timeout_s: float) -> tuple[bool, str]:
        probes.append(instance_id)
        return healthy["value"], "" if healthy["value"] else "server_error: 500"

    config = HealthConfig.model_validate(
        {"rules": {"error_ratio": 0.5, "min_requests": 10, "window_s": 10, "cooldown_s": 5, "probes": 2}}
    )
    alerter = Alerter("", CollectorRegistry())
    monitor = Monitor(config, CollectorRegistry(), alerter, probe=probe, clock=clock)
    watcher = monitor.subscribe()
    assert watcher.get_nowait().verdicts == []

    for i in range(9):  # failing, but fewer calls than min_requests
        monitor.ingest(observation("a", clock.now, ok=i % 2 == 0), "test")
        monitor.ingest(observation("b", clock.now), "test")
    monitor.evaluate(clock.now)
    assert {v.instance_id: v.status for v in monitor.verdicts().verdicts} == {"a": "available", "b": "available"}
    monitor.ingest(observation("a", clock.now, ok=False), "test")
    monitor.evaluate(clock.now)
    pushed = watcher.get_nowait()
    assert {v.instance_id: v.status for v in pushed.verdicts} == {"a": "unavailable", "b": "available"}
    assert "error ratio 0.50" in next(v.reason for v in pushed.verdicts if v.instance_id == "a")
    assert alerter.firing() == [("a", "rule")]

    clock.now += 4.9
    monitor.evaluate(clock.now)
    assert probes == []  # still cooling down
    clock.now += 0.2
    monitor.evaluate(clock.now)  # probing now; the first probe fails
    await asyncio.sleep(0.01)
    assert probes == ["a"] and monitor.verdicts().verdicts[0].status == "unavailable"

    healthy["value"] = True
    for _ in range(2):
        clock.now += 5.1
        monitor.evaluate(clock.now)
        await asyncio.sleep(0.01)
    clock.now += config.rules.probe_interval_s
    monitor.evaluate(clock.now)
    await asyncio.sleep(0.01)
    assert monitor.verdicts().verdicts[0].status == "available" and probes == ["a", "a", "a"]
    assert alerter.firing() == []
    # The failures from before it came back do not count against it again.
    monitor.evaluate(clock.now + 0.1)
    assert monitor.verdicts().verdicts[0].status == "available"
    await monitor.close()


def test_alerts_fire_once_while_a_condition_lasts() -> None:
    registry = CollectorRegistry()
    alerter = Alerter("", registry)
    firing = Alert("a", "rule", "firing", "down")
    assert alerter.raise_alert(firing) and not alerter.raise_alert(firing)
    assert not alerter.raise_alert(Alert("b", "rule", "resolved", "was never down"))
    assert alerter.raise_alert(Alert("a", "rule", "resolved", "up"))
    assert (
        registry.get_sample_value(
            "clawdbot_health_alerts_total", {"model_instance": "a", "kind": "rule", "state": "firing"}
        )
        == 1
    )


def windows(rng: random.Random, latency: float, rate: float, n: int) -> list[list[float]]:
    made = []
    for _ in range(n):
        samples = sorted(rng.gauss(latency, latency * 0.15) for _ in range(max(3, int(rate * 2))))
        stats = WindowStats(
            2.0,
            requests=len(samples),
            latency_p50_s=samples[len(samples) // 2],
            latency_p95_s=samples[int(len(samples) * 0.95) - 1],
        )
        made.append(stats.features())
    return made


def test_the_forest_flags_fivefold_latency_and_not_a_shift_in_traffic(tmp_path: Path) -> None:
    config = AnomalyConfig(min_windows=30, consecutive=3)
    missed = false_alarms = 0
    for seed in range(10):
        rng = random.Random(seed)
        slow, steady = Detector("slow", config, tmp_path / str(seed)), Detector("steady", config, None)
        for _ in range(30):
            share = rng.uniform(8, 12)
            slow.observe(windows(rng, 0.02, share, 1)[0])
            steady.observe(windows(rng, 0.02, 20 - share, 1)[0])
        assert not slow.last.ready and "0 more needed" in slow.last.note
        slow.train(slow.baseline())
        steady.train(steady.baseline())
        verdicts = [slow.observe(w) for w in windows(rng, 0.1, 3, 3)]
        missed += not verdicts[-1].anomalous
        # The steady one takes the traffic the slow one lost: more calls, same latency.
        false_alarms += any(steady.observe(w).anomalous for w in windows(rng, 0.02, 17, 20))
    assert missed == 0 and false_alarms == 0
    restored = Detector("slow", config, tmp_path / "9")
    assert restored.threshold is not None and len(restored.history) >= 30
    assert restored.observe(windows(random.Random(99), 0.1, 3, 1)[0]).anomalous_window


@pytest.mark.asyncio
async def test_a_window_with_too_few_calls_stretches_until_it_has_them() -> None:
    """An instance the routers starve of traffic is still judged: at one call a second and
    three calls needed, every third one-second window closes as a three-second one."""
    clock = Clock()
    config = HealthConfig(anomaly={"window_s": 1, "min_requests": 3, "max_stretch": 4})
    monitor = Monitor(config, CollectorRegistry(), Alerter("", CollectorRegistry()), clock=clock)
    end = clock.now
    for _ in range(9):
        monitor.ingest(observation("slow", end + 0.5), "test")
        end += 1
        clock.now = end + 0.01
        await monitor.close_window(end)
    detector = monitor._instances["slow"].detector
    assert len(detector.history) == 3
    assert detector.history[0][FEATURE_NAMES.index("rate_per_s")] == 1.0  # 3 calls in 3 s
    # An instance with no calls at all is never judged, and its window does not grow
    # without bound: after `max_stretch` windows it starts over.
    for _ in range(5):
        end += 1
        clock.now = end + 0.01
        await monitor.close_window(end)
    assert len(detector.history) == 3 and monitor._instances["slow"].stretch <= 4
    await monitor.close()


def test_latency_far_beyond_the_baseline_is_anomalous_whatever_the_forest_scores() -> None:
    """A forest scores a window past its training range no lower than the baseline's own
    extremes; on a noisy baseline (bursty traffic here) that can be above the threshold.
    The baseline's bounds catch the slowdown; a traffic shift alone stays normal."""
    config = AnomalyConfig(min_windows=30, consecutive=1)
    rng = random.Random(3)
    detector = Detector("noisy", config, None)
    for _ in range(60):
        latency = rng.uniform(0.02, 0.04)
        rate = rng.choice([2, 10, 10, 10, 40])  # bursty
        detector.observe([latency, latency * 1.3, 0.0, rate, latency, 20 / latency])
    detector.train(detector.baseline())
    assert detector.bounds["latency_p50_s"].worst < 0.04
    slow = detector.observe([0.15, 0.2, 0.0, 10, 0.15, 20 / 0.15])
    assert slow.anomalous and set(slow.beyond) == {"latency_p50_s", "latency_p95_s", "ttft_p50_s", "tokens_per_s"}
    # Twice the traffic (its twin's, moved here) at the usual latency: nothing beyond.
    shifted = detector.observe([0.03, 0.039, 0.0, 20, 0.03, 20 / 0.03])
    assert shifted.beyond == ()
    # Slower than ever seen, but not twice the median: left to the forest.
    assert detector.observe([0.045, 0.05, 0.0, 10, 0.045, 20 / 0.045]).beyond == ()
