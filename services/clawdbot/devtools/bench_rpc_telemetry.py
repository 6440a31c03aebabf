"""What tracing costs per gRPC call, done by the gate and the mesh channel
(common/server_gate.py, common/service.py) or by opentelemetry-instrumentation-grpc's
grpc.aio interceptors, and why the mesh does it by hand.

`python -m clawdbot.devtools.bench_rpc_telemetry [--calls 2000] [--rounds 3]` measures two
things, best round of each, in CPU time of this process per call:

server_wrapper_cpu_us_per_call: the server side's wrapper alone, called in-process with a
stand-in context carrying the credential, a traceparent, a request id and a dozen other
entries (no network, so little noise):
  bare_handler   the handler itself
  gate_untraced  the gate with a no-op tracer: credential, admission, request id, error
                 mapping, metrics
  gate           the product's way: the same with the SERVER span (batched, dropped)
  otel_grpc      the untraced gate behind opentelemetry-instrumentation-grpc's aio server
                 interceptor (asked per call, as grpc.aio does), which makes the span

loopback_cpu_us_per_call: sequential unary calls (a few bytes each way) over loopback to a
grpc.aio server in this process, made from inside a span (as the adapter calls the router
from inside its own), client and server and gRPC's threads together:
  plain          no gate, no credential, no tracing (the floor)
  gate_untraced, gate
                 as above, through the mesh channel (credential, traceparent, request id
                 added per call by common/service.py's wrapper)
  otel_grpc      the untraced gate and mesh channel, plus the instrumentation's aio server
                 interceptor and client interceptors for the spans and the propagation

otel_grpc is measured only when that package is importable (it is not a dependency:
`pip install opentelemetry-instrumentation-grpc==0.66b2` beside the pinned
opentelemetry-api/sdk 1.45.2 to try it).

Measured on the 2-core dev machine (grpcio 1.85.1, opentelemetry-sdk 1.45.2,
instrumentation 0.66b2), while other work ran on it:
  server wrapper: bare 0.1, gate_untraced 10.2, gate 37.7, otel_grpc 71.9 µs. The span
  costs the gate ≈ 27 µs a call, the interceptor ≈ 62 µs for the same span (it wraps
  the context in a proxy, builds a dict of the metadata twice, parses the peer address).
  loopback: plain 228, gate_untraced 385, gate 467, otel_grpc 667 µs (±15% run to run
  here): the instrumentation's client and server side together cost about 200 µs a call
  more than the gate's tracing, on a hop whose server side costs about 300 µs in all.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from clawdbot.common.admission import AdmissionControl
from clawdbot.common.metrics import Metrics
from clawdbot.common.server_gate import GatedServer, ServerGate
from clawdbot.common.service import InternalChannel
from clawdbot.devtools.bench_internal_auth import cpu_time

_METHOD = "/bench.Echo/Echo"
_TOKEN = "bench-internal-token-0123456789"
_VARIANTS = ("plain", "gate_untraced", "gate", "otel_grpc")


class _Dropped(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def _echo(request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


def _instrumentation() -> Any | None:
    try:
        # By name: it is not a dependency, and needs no type stubs here.
        return importlib.import_module("opentelemetry.instrumentation.grpc")
    except ImportError:
        return None


async def _server(kind: str, provider: TracerProvider) -> tuple[grpc.aio.Server, int]:
    server: grpc.aio.Server
    if kind == "plain":
        server = grpc.aio.server()
    else:
        tracing = provider if kind == "gate" else trace.NoOpTracerProvider()
        interceptors = []
        if kind == "otel_grpc":
            otel_grpc = _instrumentation()
            assert otel_grpc is not None
            interceptors.append(otel_grpc.aio_server_interceptor(tracer_provider=provider))
        gate = ServerGate(_TOKEN, AdmissionControl("bench", 1024), metrics=Metrics("bench"), tracer_provider=tracing)
        server = GatedServer(grpc.aio.server(interceptors=interceptors), gate)
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _channel(kind: str, target: str, provider: TracerProvider) -> grpc.aio.Channel:
    if kind == "plain":
        return grpc.aio.insecure_channel(target)
    interceptors = None
    if kind == "otel_grpc":
        otel_grpc = _instrumentation()
        assert otel_grpc is not None
        interceptors = otel_grpc.aio_client_interceptors(tracer_provider=provider)
    return InternalChannel(grpc.aio.insecure_channel(target, interceptors=interceptors), _TOKEN)


async def _variant(kind: str, calls: int) -> float:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    server, port = await _server(kind, provider)
    channel = _channel(kind, f"127.0.0.1:{port}", provider)
    echo = channel.unary_unary(_METHOD, None, None)
    try:
        # Calls from inside a span, as a service's handler makes them.
        with provider.get_tracer("bench").start_as_current_span("caller"):
            return await cpu_time(lambda: echo(b"ping"), calls)
    finally:
        await channel.close(None)
        await server.stop(None)
        provider.shutdown()


class _Context:
    """A stand-in servicer context: what the wrappers read of a call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = tuple(_Metadatum(key, value) for key, value in metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"


class _Metadatum(tuple[str, str]):
    """grpc.aio's metadata items: tuples that also have .key and .value."""

    def __new__(cls, key: str, value: str) -> _Metadatum:
        return super().__new__(cls, (key, value))

    @property
    def key(self) -> str:
        return self[0]

    @property
    def value(self) -> str:
        return self[1]


class _Details:
    method = _METHOD

    def __init__(self, metadata: Any) -> None:
        self.invocation_metadata = metadata


async def _server_side(calls: int, provider: TracerProvider) -> dict[str, float]:
    """µs of CPU per call spent in the server-side wrapper alone, without the network:
    what each way adds to every call a service serves."""
    metadata = (
        *((f"x-header-{i}", "value") for i in range(12)),  # what Envoy passes on, roughly
        ("x-clawdbot-internal-token", _TOKEN),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("x-request-id", "bench-request"),
    )
    context = _Context(metadata)
    handler = grpc.unary_unary_rpc_method_handler(_echo)

    def gate(tracing: Any) -> Any:
        gated = ServerGate(_TOKEN, AdmissionControl("bench", 1024), metrics=Metrics("bench"), tracer_provider=tracing)
        return gated.wrap(_METHOD, handler)

    untraced = gate(trace.NoOpTracerProvider())
    behaviors: dict[str, Callable[[bytes, Any], Awaitable[Any]]] = {
        "bare_handler": _echo,
        "gate_untraced": untraced.unary_unary,
        "gate": gate(provider).unary_unary,
    }
    otel_grpc = _instrumentation()
    if otel_grpc is not None:
        interceptor = otel_grpc.aio_server_interceptor(tracer_provider=provider)

        async def found(_details: Any) -> Any:
            return untraced

        async def intercepted(request: bytes, ctx: Any) -> Any:
            # grpc.aio asks the interceptor for each call, then runs what it returned.
            wrapped = await interceptor.intercept_service(found, _Details(ctx.invocation_metadata()))
            return await wrapped.unary_unary(request, ctx)

        behaviors["otel_grpc"] = intercepted
    costs = {}
    for name, behavior in behaviors.items():
        for _ in range(200):
            await behavior(b"ping", context)
        start = time.process_time()
        for _ in range(calls):
            await behavior(b"ping", context)
        costs[name] = round((time.process_time() - start) / calls * 1e6, 1)
    return costs


async def _main(calls: int, rounds: int) -> dict[str, Any]:
    kinds = [k for k in _VARIANTS if k != "otel_grpc" or _instrumentation() is not None]
    best: dict[str, float] = {}
    wrapper: dict[str, float] = {}
    for _ in range(rounds):
        for kind in kinds:
            seconds = await _variant(kind, calls)
            best[kind] = min(best.get(kind, seconds), seconds)
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(_Dropped()))
        for name, cost in (await _server_side(calls * 5, provider)).items():
            wrapper[name] = min(wrapper.get(name, cost), cost)
        provider.shutdown()
    report: dict[str, Any] = {
        "loopback_cpu_us_per_call": {kind: round(seconds / calls * 1e6, 1) for kind, seconds in best.items()},
        "server_wrapper_cpu_us_per_call": wrapper,
    }
    if _instrumentation() is None:
        report["otel_grpc"] = "not installed (pip install opentelemetry-instrumentation-grpc==0.66b2)"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clawdbot.devtools.bench_rpc_telemetry", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_main(args.calls, args.rounds)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
