"""OpenTelemetry tracing set-up and W3C trace-context propagation helpers.

Spans export over OTLP when an endpoint is configured; when traces_dir is set they are
also written as JSON lines to <traces_dir>/<service>.jsonl (what the tests read to check
that one request's spans share a trace id). Otherwise they stay in-process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

import orjson
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from clawdbot.common.config import TelemetryConfig

log = logging.getLogger(__name__)


class JsonLinesSpanExporter(SpanExporter):
    """Appends one compact JSON object per finished span to a file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = path.open("ab")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            if ctx is None:
                continue
            lines.append(
                orjson.dumps(
                    {
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name"),
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
                        "kind": span.kind.name,
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                    },
                    default=str,
                )
            )
        with self._lock:
            self._file.write(b"\n".join(lines) + b"\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def setup_tracing(service: str, config: TelemetryConfig) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": f"clawdbot-{service}"}))
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
        log.info("exporting spans over OTLP", extra={"endpoint": config.otlp_endpoint})
    if config.traces_dir:
        exporter = JsonLinesSpanExporter(Path(config.traces_dir) / f"{service}.jsonl")
        # Short delay: readers (tests, operators tailing the file) see spans promptly,
        # still batched off the request path.
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    trace.set_tracer_provider(provider)
    return provider


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | Mapping[str, str]) -> Context:
    """Trace context from gRPC metadata or HTTP headers (W3C traceparent/tracestate)."""
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    carrier = {k.lower(): v for k, v in items if isinstance(v, str)}
    return propagate.extract(carrier)


def inject_headers() -> dict[str, str]:
    """traceparent (and tracestate) for the current span, to send downstream."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
