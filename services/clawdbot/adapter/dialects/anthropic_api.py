"""Anthropic's Messages API: POST /v1/messages (streamed or not), /v1/messages/count_tokens,
and their typed gRPC twins."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import grpc
from google.api import httpbody_pb2
from google.protobuf import struct_pb2

from clawdbot.common.errors import GatewayError

if TYPE_CHECKING:
    from clawdbot.adapter.protocols.base import ProtocolContext


def _not_yet() -> GatewayError:
    return GatewayError(501, "The Messages API is not served yet.", "server_error", "not_supported")


class AnthropicRest:
    def __init__(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway

    async def messages(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        raise _not_yet()
        yield httpbody_pb2.HttpBody()

    async def count_tokens(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        raise _not_yet()


class AnthropicTyped:
    def __init__(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway

    async def create_message(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        raise _not_yet()

    async def stream_message(
        self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[struct_pb2.Struct, None]:
        raise _not_yet()
        yield struct_pb2.Struct()

    async def count_tokens(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        raise _not_yet()
