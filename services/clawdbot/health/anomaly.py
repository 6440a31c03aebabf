"""Subtle trouble: an IsolationForest per instance, trained on that instance's own recent
windows (its baseline), scores each new window. A window scoring below a low quantile of
the baseline's own scores is anomalous; `consecutive` of them in a row make the instance
anomalous (an alert and a soft routing penalty) until a normal window comes.

A forest cannot extrapolate: a window beyond the range of its training data lands in the
leaves of the baseline's most extreme windows and scores no lower than they do, so on a
noisy baseline a fivefold slowdown may score as normal. Hence a second, explicit test on
the measures where worse has a direction: a window whose latency (p50, p95, time to first
token) is at least `beyond_factor` times the baseline's median and past its worst value,
or whose tokens/s is that far below, is anomalous whatever the forest says.

Anomalous windows are kept out of the baseline, so a lasting fault does not become the new
normal. Too little history: no verdict, and the status says how much more is needed.
Models are persisted (joblib) so a restarted health service scores at once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import joblib
import numpy as np
from sklearn.ensemble import IsolationForest

from clawdbot.common.config import AnomalyConfig
from clawdbot.health.windows import FEATURE_NAMES

log = logging.getLogger(__name__)

MODEL_VERSION = 2

# The measures where worse has a direction: +1 when higher is worse, -1 when lower is.
# Not the rate (traffic moving between instances is no fault of theirs) nor the error
# ratio (the threshold rule's).
HARM: Final = {"latency_p50_s": 1, "latency_p95_s": 1, "ttft_p50_s": 1, "tokens_per_s": -1}
_HARM_INDEX: Final = {name: FEATURE_NAMES.index(name) for name in HARM}


@dataclass(frozen=True)
class Bounds:
    """One harm measure's baseline: its median and its worst value."""

    median: float
    worst: float


@dataclass(frozen=True)
class Verdict:
    ready: bool
    score: float | None = None  # the window's score_samples: lower is more anomalous
    threshold: float | None = None
    anomalous_window: bool = False
    anomalous: bool = False  # `consecutive` anomalous windows in a row
    streak: int = 0
    note: str = ""
    beyond: tuple[str, ...] = ()  # harm measures far beyond the baseline in this window


class Detector:
    def __init__(self, instance_id: str, config: AnomalyConfig, folder: Path | None) -> None:
        self.instance_id = instance_id
        self._config = config
        self._path = folder / f"{_safe(instance_id)}.joblib" if folder else None
        self.history: deque[list[float]] = deque(maxlen=config.history)
        self._model: IsolationForest | None = None
        self.threshold: float | None = None
        self.bounds: dict[str, Bounds] = {}
        self.trained_at = 0.0
        self.streak = 0
        self.last = Verdict(False, note="no windows yet")
        self._load()

    def _load(self) -> None:
        if self._path is None or not self._path.exists():
            return
        try:
            saved: dict[str, Any] = joblib.load(self._path)
        except (OSError, EOFError, ValueError, KeyError) as exc:
            log.warning("anomaly model unreadable; retraining", extra={"instance": self.instance_id, "error": str(exc)})
            return
        if saved.get("version") != MODEL_VERSION:
            return
        self._model, self.threshold, self.bounds = saved["model"], saved["threshold"], saved["bounds"]
        self.history.extend(saved["history"])
        self.trained_at = saved["trained_at"]
        log.info("anomaly model restored", extra={"instance": self.instance_id, "windows": len(self.history)})

    def _save(self, baseline: list[list[float]]) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        partial = self._path.with_suffix(".tmp")
        state = {
            "version": MODEL_VERSION,
            "model": self._model,
            "threshold": self.threshold,
            "bounds": self.bounds,
            "history": baseline,
            "trained_at": self.trained_at,
        }
        joblib.dump(state, partial)
        partial.replace(self._path)

    def baseline(self) -> list[list[float]]:
        return list(self.history)

    def train(self, baseline: list[list[float]]) -> None:
        """Fit on a copy of the baseline (this may run in a thread while windows keep
        arriving); the threshold is a low quantile of the baseline's own scores, and the
        bounds are its harm measures' medians and worst values."""
        rows = np.asarray(baseline, dtype=float)
        model = IsolationForest(n_estimators=200, random_state=0)
        model.fit(rows)
        scores = model.score_samples(rows)
        # A forest cannot score a point beyond its training data as more isolated than the
        # baseline's own extremes (it lands in their leaves): a window is anomalous when it
        # is at least as isolated as the rarest baseline windows, and `consecutive` such
        # windows in a row keep chance from raising an alert.
        threshold = float(np.quantile(scores, self._config.quantile))
        bounds = {}
        for name, worse in HARM.items():
            values = rows[:, _HARM_INDEX[name]]
            worst = float(values.max() if worse > 0 else values.min())
            bounds[name] = Bounds(float(np.median(values)), worst)
        self._model, self.threshold, self.bounds = model, threshold, bounds
        self.trained_at = time.time()
        self._save(baseline)

    def needs_training(self, now: float) -> bool:
        enough = len(self.history) >= self._config.min_windows
        return enough and (self._model is None or now - self.trained_at >= self._config.retrain_s)

    def observe(self, features: list[float]) -> Verdict:
        """Score one window (once there is a model), then keep it in the baseline if it
        was normal."""
        if self._model is None or self.threshold is None:
            self.history.append(features)
            need = self._config.min_windows - len(self.history)
            note = f"learning the baseline: {len(self.history)} windows, {max(need, 0)} more needed"
            self.last = Verdict(False, note=note)
            return self.last
        score = float(self._model.score_samples(np.asarray([features], dtype=float))[0])
        beyond = self._beyond(features)
        odd = score < self.threshold or bool(beyond)
        self.streak = self.streak + 1 if odd else 0
        if not odd:
            self.history.append(features)
        self.last = Verdict(
            True,
            score=score,
            threshold=self.threshold,
            anomalous_window=odd,
            anomalous=self.streak >= self._config.consecutive,
            streak=self.streak,
            beyond=beyond,
        )
        return self.last

    def _beyond(self, features: list[float]) -> tuple[str, ...]:
        """The harm measures of a window at least `beyond_factor` worse than the baseline's
        median and worse than anything in it (measures absent from the baseline, whose
        median is 0, are never judged)."""
        factor = self._config.beyond_factor
        found = []
        for name, bounds in self.bounds.items():
            value = features[_HARM_INDEX[name]]
            if bounds.median <= 0 or value <= 0:
                continue
            if HARM[name] > 0:
                far = value >= bounds.median * factor and value > bounds.worst
            else:
                far = value <= bounds.median / factor and value < bounds.worst
            if far:
                found.append(name)
        return tuple(found)


def _safe(instance_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in instance_id)
