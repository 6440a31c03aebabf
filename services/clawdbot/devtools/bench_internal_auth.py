"""What the internal credential and admission cost per gRPC call, and why they are applied
as wrapped handlers (common/server_gate.py) rather than as grpc.aio server interceptors.

`python -m clawdbot.devtools.bench_internal_auth [--calls 2000] [--rounds 3]`: sequential
unary calls (a few bytes each way) over loopback to a grpc.aio server in this process:

  plain         no check, no credential (the floor)
  gated         the product's way: a GatedServer (credential check and admission around
                each handler) called through internal_channel (the credential on every call)
  interceptor   the same check as a grpc.aio server interceptor, through internal_channel
  client_interceptor
                the gate, with the credential added by a grpc.aio client interceptor

The best round of each is reported, in CPU time of this process per call (client, server
and gRPC's threads together): on a machine shared with other work, wall-clock figures
swing by more than the differences measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from clawdbot.common.admission import AdmissionControl
from clawdbot.common.internal_auth import REFUSAL, TOKEN_METADATA_KEY, credential_matches, metadata_values
from clawdbot.common.server_gate import GatedServer, ServerGate
from clawdbot.common.service import internal_channel

_METHOD = "/bench.Echo/Echo"
_TOKEN = "bench-internal-token-0123456789"


async def _echo(request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


class _CheckToken(grpc.aio.ServerInterceptor):
    """The credential check as an interceptor: what the gate replaced."""

    def __init__(self) -> None:
        self._expected = _TOKEN.encode()
        self._refusal = grpc.unary_unary_rpc_method_handler(_refuse)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        if credential_matches(metadata_values(details.invocation_metadata), self._expected):
            return await continuation(details)
        return self._refusal


async def _server(kind: str) -> tuple[grpc.aio.Server, int]:
    server: grpc.aio.Server
    if kind == "gate":
        server = GatedServer(grpc.aio.server(), ServerGate(_TOKEN, AdmissionControl("bench", 1024)))
    elif kind == "interceptor":
        server = grpc.aio.server(interceptors=[_CheckToken()])
    else:
        server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class _AddToken(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        metadata = (*(details.metadata or ()), (TOKEN_METADATA_KEY, _TOKEN))
        return await continuation(details._replace(metadata=metadata), request)


async def cpu_time(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    """CPU seconds this process spends on `calls` awaits of call(), after a warm-up."""
    for _ in range(100):  # warm up: connection, method lookup caches
        await call()
    # CPU time of this process (client, server and gRPC's threads): on a machine shared
    # with other work, wall-clock figures swing by more than the differences measured.
    start = time.process_time()
    for _ in range(calls):
        await call()
    return time.process_time() - start


async def _variant(name: str, calls: int) -> float:
    server, port = await _server({"plain": "plain", "interceptor": "interceptor"}.get(name, "gate"))
    target = f"127.0.0.1:{port}"
    if name == "plain":
        channel = grpc.aio.insecure_channel(target)
    elif name == "client_interceptor":
        channel = grpc.aio.insecure_channel(target, interceptors=[_AddToken()])  # type: ignore[list-item]
    else:
        channel = internal_channel(target, _TOKEN)
    echo = channel.unary_unary(_METHOD, None, None)
    try:
        return await cpu_time(lambda: echo(b"ping"), calls)
    finally:
        await channel.close(None)
        await server.stop(None)


async def _main(calls: int, rounds: int) -> dict[str, dict[str, float]]:
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name in ("plain", "gated", "interceptor", "client_interceptor"):
            seconds = await _variant(name, calls)
            best[name] = min(best.get(name, seconds), seconds)
    return {
        name: {"cpu_us_per_call": round(seconds / calls * 1e6, 1), "calls_per_cpu_s": round(calls / seconds)}
        for name, seconds in best.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clawdbot.devtools.bench_internal_auth", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_main(args.calls, args.rounds)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
