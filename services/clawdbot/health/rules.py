"""The threshold rule, per instance, as a small state machine:

available ──(error ratio ≥ R over ≥ N calls in the window)──► unavailable
unavailable ──(cool-down passed)──► probing: one probe request every probe interval
probing ──(`probes` successes in a row)──► available        probing ──(a failure)──► unavailable

While unavailable or probing the router sends it no traffic (unless no instance of the
model is left; see router/health_view.py). Calls that still reach it (requests already
under way) do not count towards coming back: only probes do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from clawdbot.common.config import HealthRule
from clawdbot.health.windows import WindowStats

AVAILABLE: Final = "available"
UNAVAILABLE: Final = "unavailable"
PROBING: Final = "probing"


@dataclass(frozen=True)
class Transition:
    instance_id: str
    before: str
    after: str
    reason: str


class RuleState:
    def __init__(self, instance_id: str, rule: HealthRule) -> None:
        self.instance_id = instance_id
        self.rule = rule
        self.status = AVAILABLE
        self.reason = ""
        self.since = 0.0
        self._probe_due = 0.0
        self._successes = 0
        self.probe_in_flight = False

    def _move(self, to: str, now: float, reason: str) -> Transition:
        before, self.status, self.reason, self.since = self.status, to, reason, now
        return Transition(self.instance_id, before, to, reason)

    def evaluate(self, stats: WindowStats, now: float) -> Transition | None:
        """The transition this window causes, if any (probing moves on probe results)."""
        rule = self.rule
        if self.status == AVAILABLE:
            if stats.requests >= rule.min_requests and stats.error_ratio >= rule.error_ratio:
                reason = (
                    f"error ratio {stats.error_ratio:.2f} ≥ {rule.error_ratio:g} over {stats.requests} calls "
                    f"in {rule.window_s:g} s"
                )
                return self._move(UNAVAILABLE, now, reason)
        elif self.status == UNAVAILABLE and now - self.since >= rule.cooldown_s:
            self._successes, self._probe_due = 0, now
            return self._move(PROBING, now, f"cool-down of {rule.cooldown_s:g} s passed; probing")
        return None

    def probe_due(self, now: float) -> bool:
        return self.status == PROBING and not self.probe_in_flight and now >= self._probe_due

    def probed(self, ok: bool, now: float, detail: str) -> Transition | None:
        self.probe_in_flight = False
        if self.status != PROBING:
            return None
        if not ok:
            return self._move(UNAVAILABLE, now, f"probe failed: {detail}")
        self._successes += 1
        self._probe_due = now + self.rule.probe_interval_s
        if self._successes >= self.rule.probes:
            return self._move(AVAILABLE, now, f"{self._successes} probes in a row succeeded")
        return None
