"""OpenAI's Responses API: POST /v1/responses (streamed or not), GET and DELETE
/v1/responses/{id}, its input items, /v1/responses/input_tokens, and the typed twins."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import grpc
from google.api import httpbody_pb2
from google.protobuf import struct_pb2

from clawdbot.common.errors import GatewayError
from clawdbot.gen.v1 import gateway_pb2

if TYPE_CHECKING:
    from clawdbot.adapter.protocols.base import ProtocolContext


def _not_yet() -> GatewayError:
    return GatewayError(501, "The Responses API is not served yet.", "server_error", "not_supported")


class ResponsesRest:
    def __init__(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway

    async def create(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        raise _not_yet()
        yield httpbody_pb2.HttpBody()

    async def input_tokens(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        raise _not_yet()

    async def get(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        raise _not_yet()

    async def delete(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        raise _not_yet()

    async def input_items(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        raise _not_yet()


class ResponsesTyped:
    def __init__(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway

    async def create(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        raise _not_yet()

    async def stream(
        self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[struct_pb2.Struct, None]:
        raise _not_yet()
        yield struct_pb2.Struct()

    async def get(self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        raise _not_yet()

    async def delete(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        raise _not_yet()

    async def input_items(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        raise _not_yet()

    async def input_tokens(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        raise _not_yet()
