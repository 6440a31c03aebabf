"""What every gRPC call gets from common/ without its handler or call site doing anything:
the server gate's span (child of the caller's), request id, error mapping and metrics,
and the mesh channel's trace context, request id and default deadline. A real grpc.aio
server and channel on loopback; spans caught in memory."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from clawdbot.common.admission import AdmissionControl
from clawdbot.common.config import ServiceEndpoint, TelemetryConfig
from clawdbot.common.errors import ERROR_METADATA_KEY, GatewayError
from clawdbot.common.logging import request_id_var
from clawdbot.common.metrics import Metrics
from clawdbot.common.server_gate import GatedServer, ServerGate
from clawdbot.common.service import grpc_target, internal_channel, mesh_channel
from clawdbot.common.telemetry import remote_context, trace_metadata, tracer_provider
from tests.support import wait_for_async

_TOKEN = "unit-test-internal-token"
_SERVICE = "test.Plumbing"


class _Handlers:
    """What the handlers saw of their call."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.time_remaining: list[float | None] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.request_ids.append(request_id_var.get())
        self.time_remaining.append(context.time_remaining())
        return request

    async def refuse(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise GatewayError.bad_request("that will not do", "input")

    async def crash(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise RuntimeError("secret detail of a bug")

    async def abort(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise AssertionError("unreachable: abort raises")

    async def hold(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.started.set()
        await self.release.wait()
        return request

    async def count(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        yield b"1"
        yield b"2"
        raise GatewayError.unavailable("ran dry mid-stream")

    async def gather(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"".join([r async for r in requests])

    async def chat(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request.upper()


class _Served:
    def __init__(self, server: grpc.aio.Server, port: int, spans: InMemorySpanExporter, metrics: Metrics) -> None:
        self.server, self.port, self.exporter, self.metrics = server, port, spans, metrics
        self.provider: TracerProvider | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def server_spans(self, method: str) -> list[ReadableSpan]:
        return [s for s in self.spans(f"{_SERVICE}/{method}") if s.kind == SpanKind.SERVER]

    async def ended_spans(self, method: str, count: int = 1) -> list[ReadableSpan]:
        """The method's server spans once `count` have ended. A caller may hold its answer
        (or its error) before the gate has ended the call's span: the gate ends it, and
        records the call's duration with it, as the handler's task unwinds."""

        async def ended() -> list[ReadableSpan] | None:
            spans = self.server_spans(method)
            return spans if len(spans) >= count else None

        return await wait_for_async(ended, 10, f"{count} ended {method} span(s)")

    def duration_count(self, method: str, code: int) -> float:
        value = self.metrics.registry.get_sample_value(
            "rpc_server_duration_seconds_count",
            {"service": "test", "rpc_method": f"{_SERVICE}/{method}", "rpc_grpc_status_code": str(code)},
        )
        return value or 0.0

    def in_flight(self) -> float:
        return self.metrics.registry.get_sample_value("clawdbot_requests_in_flight", {"service": "test"}) or 0.0


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracer_provider, exporter
    tracer_provider.shutdown()


@pytest_asyncio.fixture
async def served(provider: tuple[TracerProvider, InMemorySpanExporter]) -> AsyncIterator[tuple[_Served, _Handlers]]:
    tracer_provider, exporter = provider
    handlers = _Handlers()
    metrics = Metrics("test")
    gate = ServerGate(_TOKEN, AdmissionControl("test", 16), metrics=metrics, tracer_provider=tracer_provider)
    server = GatedServer(grpc.aio.server(), gate)
    methods = {
        "Echo": grpc.unary_unary_rpc_method_handler(handlers.echo),
        "Refuse": grpc.unary_unary_rpc_method_handler(handlers.refuse),
        "Crash": grpc.unary_unary_rpc_method_handler(handlers.crash),
        "Abort": grpc.unary_unary_rpc_method_handler(handlers.abort),
        "Hold": grpc.unary_unary_rpc_method_handler(handlers.hold),
        "Count": grpc.unary_stream_rpc_method_handler(handlers.count),
        "Gather": grpc.stream_unary_rpc_method_handler(handlers.gather),
        "Chat": grpc.stream_stream_rpc_method_handler(handlers.chat),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(_SERVICE, methods)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    running = _Served(server, port, exporter, metrics)
    running.provider = tracer_provider
    try:
        yield running, handlers
    finally:
        await server.stop(None)


def _unary(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{_SERVICE}/{method}", request_serializer=None, response_deserializer=None)


@pytest.mark.asyncio
async def test_a_call_is_a_server_span_child_of_the_callers_with_its_request_id(
    served: tuple[_Served, _Handlers],
) -> None:
    running, handlers = served
    assert running.provider is not None
    tracer = running.provider.get_tracer("test")
    async with internal_channel(running.target, _TOKEN) as channel:
        request_id_var.set("req-123")
        with tracer.start_as_current_span("caller") as caller:
            assert await _unary(channel, "Echo")(b"hi", timeout=10) == b"hi"
        request_id_var.set("")
        # Outside any span and request: a new trace, and no request id.
        assert await _unary(channel, "Echo")(b"again", timeout=10) == b"again"
    first, second = await running.ended_spans("Echo", 2)
    assert first.context.trace_id == caller.get_span_context().trace_id
    assert first.parent is not None and first.parent.span_id == caller.get_span_context().span_id
    assert first.parent.is_remote
    assert dict(first.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": _SERVICE,
        "rpc.method": "Echo",
        "rpc.grpc.status_code": 0,
        "clawdbot.request_id": "req-123",
    }
    assert first.status.status_code == StatusCode.UNSET
    assert handlers.request_ids == ["req-123", ""]  # in the handler's logging context
    assert second.parent is None and second.context.trace_id != first.context.trace_id
    assert running.duration_count("Echo", 0) == 2


@pytest.mark.asyncio
async def test_a_gateway_error_becomes_its_status_message_and_trailing_error(served: tuple[_Served, _Handlers]) -> None:
    running, _handlers = served
    async with internal_channel(running.target, _TOKEN) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _unary(channel, "Refuse")(b"", timeout=10)
    err = raised.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "that will not do"
    assert GatewayError.from_rpc_error(err, "test") == GatewayError.bad_request("that will not do", "input")
    assert any(key == ERROR_METADATA_KEY for key, _value in err.trailing_metadata() or ())
    [span] = await running.ended_spans("Refuse")
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 3
    # The caller's mistake: not an error of the server's (the semantic conventions).
    assert span.status.status_code == StatusCode.UNSET
    assert running.duration_count("Refuse", 3) == 1


@pytest.mark.asyncio
async def test_a_bug_is_logged_with_its_traceback_and_answered_without_details(
    served: tuple[_Served, _Handlers], caplog: pytest.LogCaptureFixture
) -> None:
    running, _handlers = served
    caplog.set_level(logging.ERROR, logger="clawdbot.common.server_gate")
    async with internal_channel(running.target, _TOKEN) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _unary(channel, "Crash")(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "secret detail" not in (raised.value.details() or "")
    assert GatewayError.from_rpc_error(raised.value, "test").code == "internal_error"
    [record] = [r for r in caplog.records if r.getMessage() == "call failed"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert record.__dict__["rpc"] == f"{_SERVICE}/Crash"
    [span] = await running.ended_spans("Crash")
    assert span.status.status_code == StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


@pytest.mark.asyncio
async def test_a_handlers_own_abort_keeps_its_status_on_the_span(served: tuple[_Served, _Handlers]) -> None:
    running, _handlers = served
    async with internal_channel(running.target, _TOKEN) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _unary(channel, "Abort")(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND and raised.value.details() == "no such thing"
    [span] = await running.ended_spans("Abort")
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 5
    assert running.duration_count("Abort", 5) == 1


@pytest.mark.asyncio
async def test_streams_are_traced_until_they_end_and_fail_with_their_status(served: tuple[_Served, _Handlers]) -> None:
    running, _handlers = served
    assert running.provider is not None
    tracer = running.provider.get_tracer("test")
    async with internal_channel(running.target, _TOKEN) as channel:
        count = channel.unary_stream(f"/{_SERVICE}/Count", request_serializer=None, response_deserializer=None)
        gather = channel.stream_unary(f"/{_SERVICE}/Gather", request_serializer=None, response_deserializer=None)
        chat = channel.stream_stream(f"/{_SERVICE}/Chat", request_serializer=None, response_deserializer=None)
        with tracer.start_as_current_span("caller") as caller:
            got: list[bytes] = []
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for message in count(b"", timeout=10):
                    got.append(message)
            assert got == [b"1", b"2"] and raised.value.code() == grpc.StatusCode.UNAVAILABLE

            async def parts() -> AsyncIterator[bytes]:
                for part in (b"a", b"b"):
                    yield part

            assert await gather(parts(), timeout=10) == b"ab"
            assert [m async for m in chat(parts(), timeout=10)] == [b"A", b"B"]
    trace_id = caller.get_span_context().trace_id
    for method, code in (("Count", 14), ("Gather", 0), ("Chat", 0)):
        [span] = await running.ended_spans(method)
        assert span.context.trace_id == trace_id, method
        assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == code, method
    [failed] = await running.ended_spans("Count")
    assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "ran dry mid-stream"


@pytest.mark.asyncio
async def test_calls_in_flight_are_counted_while_they_run(served: tuple[_Served, _Handlers]) -> None:
    running, handlers = served
    async with internal_channel(running.target, _TOKEN) as channel:
        held = asyncio.ensure_future(_unary(channel, "Hold")(b"x", timeout=10))
        await asyncio.wait_for(handlers.started.wait(), 10)
        assert running.in_flight() == 1
        handlers.release.set()
        assert await held == b"x"
    assert running.in_flight() == 0


@pytest.mark.asyncio
async def test_a_refused_caller_gets_no_span(served: tuple[_Served, _Handlers]) -> None:
    running, _handlers = served
    async with internal_channel(running.target, "not-the-token") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _unary(channel, "Echo")(b"", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert running.spans() == []


@pytest.mark.asyncio
async def test_the_mesh_channel_gives_unary_calls_its_service_deadline(served: tuple[_Served, _Handlers]) -> None:
    running, handlers = served
    endpoint = ServiceEndpoint(host="127.0.0.1", grpc_port=running.port, http_port=0, call_timeout_s=7)
    async with mesh_channel(endpoint, _TOKEN) as channel:
        await _unary(channel, "Echo")(b"")
        await _unary(channel, "Echo")(b"", timeout=60)
    defaulted, explicit = handlers.time_remaining
    assert defaulted is not None and 5 < defaulted < 8  # gRPC rounds deadlines up a little
    assert explicit is not None and 50 < explicit < 61


@pytest.mark.asyncio
async def test_a_call_sites_own_trace_context_wins(served: tuple[_Served, _Handlers]) -> None:
    running, _handlers = served
    assert running.provider is not None
    theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with internal_channel(running.target, _TOKEN) as channel:
        with running.provider.get_tracer("test").start_as_current_span("caller"):
            await _unary(channel, "Echo")(b"", timeout=10, metadata=(("traceparent", theirs),))
    [span] = await running.ended_spans("Echo")
    assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"


def test_a_service_is_dialled_at_its_configured_host_and_port() -> None:
    assert grpc_target(ServiceEndpoint(host="router.mesh", grpc_port=7011, http_port=0)) == "router.mesh:7011"
    assert grpc_target(ServiceEndpoint(host="::1", grpc_port=7011, http_port=0)) == "[::1]:7011"


# --- the tracer provider and the trace context on the wire ---------------------------------

_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _sampled(traceparent: str) -> bool:
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)


def test_without_an_exporter_spans_are_not_recorded_but_keep_their_ids(tmp_path: Path) -> None:
    provider = tracer_provider("test", TelemetryConfig())
    try:
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("root") as root:
            assert not root.is_recording()
            assert root.get_span_context().is_valid  # logs and the next hop still get ids
            sent = dict(trace_metadata())
            with tracer.start_as_current_span("child") as child:
                assert child.get_span_context().trace_id == root.get_span_context().trace_id
        assert not _sampled(sent["traceparent"])  # so nobody below records it either
        # A caller's sampled trace is honoured, and its flag travels on.
        with tracer.start_as_current_span("served", context=remote_context(_PARENT)) as served:
            assert served.is_recording()
            assert _sampled(dict(trace_metadata())["traceparent"])
    finally:
        provider.shutdown()


def test_with_traces_dir_every_span_is_written_as_a_json_line(tmp_path: Path) -> None:
    provider = tracer_provider("test", TelemetryConfig(traces_dir=str(tmp_path)))
    with provider.get_tracer("test").start_as_current_span("root") as root:
        assert root.is_recording()
    provider.shutdown()  # flushes the batch
    [written] = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert written["name"] == "root" and written["service"] == "clawdbot-test"
    assert written["trace_id"] == format(root.get_span_context().trace_id, "032x")


@pytest.mark.parametrize(
    "header",
    [
        _PARENT,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero ids: none
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case: refused
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later",  # a later version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "garbage",
        "",
    ],
)
def test_the_callers_traceparent_reads_as_the_w3c_propagator_reads_it(header: str) -> None:
    ours = get_current_span(remote_context(header)).get_span_context()
    theirs = get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header})).get_span_context()
    assert ours == theirs
