"""Log lines in Elastic Common Schema: the field names Filebeat and Elasticsearch expect."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from clawdbot.common.logging import ECS_VERSION, ENVOY_LOG_FORMAT, JsonFormatter, request_id_var

# Every top-level key a line may carry: ECS fields, and our own object.
ECS_KEYS = {
    "@timestamp",
    "log.level",
    "message",
    "ecs.version",
    "service.name",
    "log.logger",
    "http.request.id",
    "trace.id",
    "span.id",
    "error.type",
    "error.message",
    "error.stack_trace",
    "clawdbot",
}


def line(record: logging.LogRecord, service: str = "router") -> dict[str, Any]:
    text = JsonFormatter(service).format(record)
    assert "\n" not in text  # one line each, whatever the message holds
    entry: dict[str, Any] = json.loads(text)
    assert set(entry) <= ECS_KEYS, set(entry) - ECS_KEYS
    return entry


def record(msg: str = "hello %s", args: tuple[object, ...] = ("world",), **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("clawdbot.router.server")
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, args, None, extra=extra)


def test_core_fields_come_first_with_ecs_names() -> None:
    entry = line(record())
    assert list(entry)[:3] == ["@timestamp", "log.level", "message"]
    assert entry["message"] == "hello world"
    assert entry["log.level"] == "warning"
    assert entry["service.name"] == "router"
    assert entry["log.logger"] == "clawdbot.router.server"
    assert entry["ecs.version"] == ECS_VERSION
    assert entry["@timestamp"].endswith("Z") and "T" in entry["@timestamp"]
    # No pre-ECS names linger.
    assert not {"ts", "level", "msg", "logger", "service", "request_id", "trace_id", "span_id", "exc"} & set(entry)


def test_request_and_trace_ids() -> None:
    assert "http.request.id" not in line(record())
    token = request_id_var.set("req-42")
    try:
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("call") as span:
            entry = line(record())
            context = span.get_span_context()
    finally:
        request_id_var.reset(token)
    assert entry["http.request.id"] == "req-42"
    assert entry["trace.id"] == format(context.trace_id, "032x")
    assert entry["span.id"] == format(context.span_id, "016x")
    assert "trace.id" not in line(record())


def test_extra_fields_live_under_clawdbot() -> None:
    # "error" and "message" would collide with ECS fields at the top level.
    entry = line(record(job="j-1", error="upstream 502", message_count=3, attempt=2))
    assert entry["clawdbot"] == {"job": "j-1", "error": "upstream 502", "message_count": 3, "attempt": 2}
    assert entry["message"] == "hello world"
    assert "error.message" not in entry
    assert "clawdbot" not in line(record())


def test_exception_fields() -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        failed = record("failed", ())
        failed.exc_info = sys.exc_info()
    entry = line(failed)
    assert entry["error.type"] == "ValueError"
    assert entry["error.message"] == "bad value"
    assert "Traceback" in entry["error.stack_trace"] and "bad value" in entry["error.stack_trace"]


def test_envoy_lines_have_the_same_shape() -> None:
    # What Envoy prints for --log-format, with its spdlog flags filled in.
    sample = (
        ENVOY_LOG_FORMAT.replace("%Y-%m-%dT%T.%eZ", "2026-01-01T00:00:00.000Z")
        .replace("%l", "warning")
        .replace("%j", "upstream reset")
        .replace("%n", "router")
    )
    entry = json.loads(sample)
    assert set(entry) <= ECS_KEYS
    assert list(entry)[:3] == ["@timestamp", "log.level", "message"]
    assert entry["service.name"] == "envoy" and entry["ecs.version"] == ECS_VERSION
