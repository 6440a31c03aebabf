"""OpenTelemetry tracing set-up and W3C trace-context propagation helpers.

Spans export over OTLP when an endpoint is configured; when traces_dir is set they are
also written as JSON lines to <traces_dir>/<service>.jsonl (what the tests read to check
that one request's spans share a trace id). Otherwise they stay in-process.

Between services the trace context travels as W3C `traceparent`/`tracestate` metadata:
every mesh channel adds it to each call (common/service.py) and every server reads it
(common/server_gate.py), with the two helpers at the end of this module. Headers and
Kafka records go through the configured propagator (inject_headers, extract_context).

The aiohttp instrumentations are not used either, for want of a fit: the router's call to
a provider already has its CLIENT span, with the model and instance on it (the client
instrumentation would add a second span per request and inject the same header), and the
adapter's WebSocket side wants a span per frame, which is a request, not one per
connection, which is what the server instrumentation would give (gateway.span).
"""

from __future__ import annotations

import logging
import re
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
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from clawdbot.common.config import TelemetryConfig

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

Metadata = tuple[tuple[str, str], ...]


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
    """The service's tracer provider (see tracer_provider), set as the process's."""
    provider = tracer_provider(service, config)
    trace.set_tracer_provider(provider)
    return provider


def tracer_provider(service: str, config: TelemetryConfig) -> TracerProvider:
    """Spans of `service`, exported as configured.

    With nowhere to send spans (neither OTLP nor traces_dir), spans are not recorded
    (a parent-based sampler that starts no trace as sampled): every span still has its ids,
    so logs carry trace.id and span.id and every hop passes the trace on, but no span is
    built only to be dropped, which cost each call tens of microseconds for nothing. A
    caller's traceparent marked sampled is still honoured, so its flag travels on. With an
    exporter, OTEL_TRACES_SAMPLER decides, as usual (default: every request)."""
    resource = Resource.create({"service.name": f"clawdbot-{service}"})
    exporting = bool(config.otlp_endpoint or config.traces_dir)
    provider = TracerProvider(resource=resource, sampler=None if exporting else ParentBased(ALWAYS_OFF))
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
        log.info("exporting spans over OTLP", extra={"endpoint": config.otlp_endpoint})
    if config.traces_dir:
        exporter = JsonLinesSpanExporter(Path(config.traces_dir) / f"{service}.jsonl")
        # Short delay: readers (tests, operators tailing the file) see spans promptly,
        # still batched off the request path.
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
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


# Stateless; one for the process. W3C trace context only: the mesh's own hops speak
# nothing else, whatever propagator the process is configured with for HTTP.
_W3C = TraceContextTextMapPropagator()
_NO_PARENT = Context()
# What the mesh's own hops send (lower-case hex, as W3C requires).
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def remote_context(traceparent: str | None, tracestate: str | None = None) -> Context:
    """The caller's span as a parent context, from a call's W3C metadata (an empty
    context, so a new trace, when there is none or it does not parse).

    The version-00 form every hop of the mesh sends ("00-<32 hex>-<16 hex>-<2 hex>") is
    read by hand, in half the propagator's time (which builds a carrier, looks it up and
    matches a looser expression); anything else goes through the propagator and its checks."""
    if not traceparent:
        return _NO_PARENT
    if not tracestate and (match := _TRACEPARENT_00.fullmatch(traceparent)):
        trace_id, span_id, flags = match.groups()
        parent = SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(int(flags, 16)))
        if not parent.is_valid:  # all-zero ids
            return _NO_PARENT
        return trace.set_span_in_context(NonRecordingSpan(parent), _NO_PARENT)
    carrier = {TRACEPARENT: traceparent}
    if tracestate:
        carrier[TRACESTATE] = tracestate
    return _W3C.extract(carrier)


def trace_metadata() -> Metadata:
    """traceparent (and tracestate) of the current span, as gRPC metadata; () outside a
    span. Formatted here rather than through propagate.inject, which builds a carrier
    dict and walks the configured propagators on every call of the hot path."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return ()
    traceparent = f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"
    if span_context.trace_state:
        return ((TRACEPARENT, traceparent), (TRACESTATE, span_context.trace_state.to_header()))
    return ((TRACEPARENT, traceparent),)
