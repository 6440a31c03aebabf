"""A job's record: what was asked, by whom, and how it stands. Stored as JSON (Redis, or
memory) and sent as JSON through Kafka; its owner is shown public() (common/clients/jobs.py
is what the adapter reads that with)."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from google.protobuf import json_format

from clawdbot.common.jobs import Status
from clawdbot.gen.v1 import router_pb2


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
    # The submitter's key grant (router_pb2.KeyGrant as JSON, see grant_json), passed on
    # to the router with every call the job makes; None: submitted without one (a record
    # from before grants existed), and the calls carry none.
    grant: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Job:
        """Fields it does not know are left out: a record written by a newer jobs service
        (rolling upgrades share Redis and Kafka) still reads."""
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise TypeError(f"a job record is a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in known})

    @property
    def key_grant(self) -> router_pb2.KeyGrant | None:
        """The submitter's grant as the router takes it; None without one."""
        if self.grant is None:
            return None
        return json_format.ParseDict(self.grant, router_pb2.KeyGrant(), ignore_unknown_fields=True)

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


def grant_json(meta: router_pb2.RequestMeta) -> dict[str, Any] | None:
    """The grant a submission's meta carries, as a job record keeps it; None without one."""
    if not meta.HasField("grant"):
        return None
    return json_format.MessageToDict(meta.grant, preserving_proto_field_name=True)
