"""Subtle trouble: an IsolationForest per instance, trained on that instance's own recent
windows (its baseline), scores each new window. A window scoring below a low quantile of
the baseline's own scores is anomalous; `consecutive` of them in a row make the instance
anomalous (an alert and a soft routing penalty) until a normal window comes.

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
from typing import Any

import joblib
import numpy as np
from sklearn.ensemble import IsolationForest

from clawdbot.common.config import AnomalyConfig

log = logging.getLogger(__name__)

MODEL_VERSION = 1


@dataclass(frozen=True)
class Verdict:
    ready: bool
    score: float | None = None  # the window's score_samples: lower is more anomalous
    threshold: float | None = None
    anomalous_window: bool = False
    anomalous: bool = False  # `consecutive` anomalous windows in a row
    streak: int = 0
    note: str = ""


class Detector:
    def __init__(self, instance_id: str, config: AnomalyConfig, folder: Path | None) -> None:
        self.instance_id = instance_id
        self._config = config
        self._path = folder / f"{_safe(instance_id)}.joblib" if folder else None
        self.history: deque[list[float]] = deque(maxlen=config.history)
        self._model: IsolationForest | None = None
        self.threshold: float | None = None
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
        self._model, self.threshold = saved["model"], saved["threshold"]
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
            "history": baseline,
            "trained_at": self.trained_at,
        }
        joblib.dump(state, partial)
        partial.replace(self._path)

    def baseline(self) -> list[list[float]]:
        return list(self.history)

    def train(self, baseline: list[list[float]]) -> None:
        """Fit on a copy of the baseline (this may run in a thread while windows keep
        arriving); the threshold sits below the baseline's own lowest scores."""
        rows = np.asarray(baseline, dtype=float)
        model = IsolationForest(n_estimators=200, random_state=0)
        model.fit(rows)
        scores = model.score_samples(rows)
        # A forest cannot score a point beyond its training data as more isolated than the
        # baseline's own extremes (it lands in their leaves): a window is anomalous when it
        # is at least as isolated as the rarest baseline windows, and `consecutive` such
        # windows in a row keep chance from raising an alert.
        threshold = float(np.quantile(scores, self._config.quantile))
        self._model, self.threshold = model, threshold
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
        odd = score < self.threshold
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
        )
        return self.last


def _safe(instance_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in instance_id)
