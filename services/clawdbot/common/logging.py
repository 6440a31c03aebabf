"""Structured JSON logs in Elastic Common Schema (ECS), carrying the request id and the
trace id.

One JSON object a line, on stderr, with ECS field names written as flat dotted keys the
way Elastic's own ECS loggers (ecs-logging-python, ecs-logging-java) write them:
`@timestamp`, `log.level` and `message` first, then `ecs.version`, `service.name`,
`log.logger`, `http.request.id`, `trace.id`, `span.id`, and for an exception
`error.type`, `error.message` and `error.stack_trace`. Filebeat (deploy/filebeat/) and
Elasticsearch read the dots as nesting. Whatever a call passes in `extra=` is ours, not
ECS: it goes under one `clawdbot` object ({"clawdbot": {"job": "..."}}), so it can never
collide with an ECS field (ECS `labels` would do only for flat strings).

The request id lives in a ContextVar, so every log line written while serving a request
carries the id without passing it around: the adapter sets it when it accepts a request
(Envoy's `x-request-id`, or one it makes), every mesh channel sends it on as `x-request-id`
metadata (common/service.py), and every service's gate sets it from there for the call
(common/server_gate.py). The trace id is read from the current OpenTelemetry span, which
the gate makes current for each call.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson
from opentelemetry import trace

# The ECS version the field names follow.
ECS_VERSION = "8.11.0"

# Envoy's own (application) log lines in the same shape, for its --log-format. spdlog
# flags: %l level, %n logger, %j the message escaped for JSON. Timestamps are UTC in a
# container; access logs are a separate stream (envoy/envoy.yaml.tmpl).
ENVOY_LOG_FORMAT = (
    '{"@timestamp":"%Y-%m-%dT%T.%eZ","log.level":"%l","message":"%j",'
    f'"ecs.version":"{ECS_VERSION}","service.name":"envoy","log.logger":"%n"}}'
)

# The object our own (non-ECS) fields live in.
EXTRA_FIELDS_KEY = "clawdbot"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("clawdbot_request_id", default="")
# The metadata entry (and HTTP header) the request id travels in between services.
REQUEST_ID_METADATA_KEY = "x-request-id"

# Attributes every LogRecord has; anything else passed via `extra=` is a field of ours.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "log.level": record.levelname.lower(),
            "message": record.getMessage(),
            "ecs.version": ECS_VERSION,
            "service.name": self._service,
            "log.logger": record.name,
        }
        request_id = request_id_var.get()
        if request_id:
            entry["http.request.id"] = request_id
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace.id"] = format(span_context.trace_id, "032x")
            entry["span.id"] = format(span_context.span_id, "016x")
        if record.exc_info and record.exc_info[0] is not None:
            entry["error.type"] = record.exc_info[0].__name__
            entry["error.message"] = str(record.exc_info[1])
            entry["error.stack_trace"] = self.formatException(record.exc_info)
        extras = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        }
        if extras:
            entry[EXTRA_FIELDS_KEY] = extras
        return orjson.dumps(entry, default=str).decode()


def setup_logging(service: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log every connection at INFO drown the request lines.
    for noisy in ("aiohttp.access", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
