"""A job's record: what was asked, by whom, and how it stands. Stored as JSON (Redis, or
memory) and sent as JSON through Kafka; its owner is shown public() (common/clients/jobs.py
is what the adapter reads that with)."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from clawdbot.common.jobs import Status


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


@dataclass
class Job:
    id: str
    kind: str
    api_key_id: str
    request: dict[str, Any]
    callback_url: str = ""
    status: Status = "queued"
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    durable: bool = True
    # Set once its result went to the results topic (a redelivery then has nothing to do).
    published: bool = False

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Job:
        return cls(**orjson.loads(raw))

    def public(self) -> dict[str, Any]:
        """What its owner sees: no request echo (it may be large), no internal fields."""
        shown: dict[str, Any] = {
            "id": self.id,
            "object": "job",
            "kind": self.kind,
            "status": self.status,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "durable": self.durable,
        }
        if self.callback_url:
            shown["callback_url"] = self.callback_url
        if self.result is not None:
            shown["result"] = self.result
        if self.error is not None:
            shown["error"] = self.error
        return shown
