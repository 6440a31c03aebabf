"""Connector for Anthropic's Messages API (`connector: anthropic`).

Two paths:
- translated: the router's Chat Completions body is encoded as a Messages request and
  the Message (or its events) decoded back into Chat, with the mapping tables of
  common/dialects/anthropic.py;
- native (pass-through): a caller that spoke Messages itself has its own body sent on,
  untouched but for the model name, with its anthropic-version and anthropic-beta headers,
  and gets the upstream's answer, or its events, as they came.

Either way the credentials are the gateway's (x-api-key from `api_key_env`): a caller's
Authorization never travels upstream (only the headers named in NATIVE_HEADERS do).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from clawdbot.common.dialects import anthropic as dialect
from clawdbot.common.errors import GatewayError
from clawdbot.router.connectors.base import Answer, NativeRequest
from clawdbot.router.connectors.native import NotAnObject, passed_body
from clawdbot.router.connectors.openai import UpstreamError, provider_failure
from clawdbot.router.registry import Instance

_MESSAGES_PATH = "/messages"
# The gateway's options in a request body (router/server.py GATEWAY_FIELD).
GATEWAY_FIELD = "clawdbot"
# Events that open a stream without saying anything yet: held back until the next one,
# so that an error right after them (Anthropic's overload arrives there) is still a
# failure another instance may take over, not a broken stream.
_PREAMBLE = frozenset({"message_start", "ping"})


def map_status(instance: Instance, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    """An Anthropic HTTP error (or, with status 0, an `error` event) as an UpstreamError:
    429 rate limited and 529/5xx server errors are retryable elsewhere; a 401/403 is the
    gateway's own key failing (502); other 4xx are the request's fault, with the upstream's
    message."""
    failure = dialect.error_from_anthropic(status, body)
    where = f"upstream {instance.id}"
    what = f"HTTP {status}"
    if status == 0:  # an error event: its type says what status it would have had
        status, what = _event_status(body), "an error event"
    common = provider_failure(instance, status, failure.message, headers.get("retry-after"))
    if common is not None:
        return common
    if status == dialect.OVERLOADED_STATUS:
        # Kept as the 503 `overloaded` error_from_anthropic makes of it: the Messages route
        # answers it as 529 overloaded_error, which Anthropic's clients retry.
        return UpstreamError.make(
            failure.status,
            f"{where} is overloaded: {failure.message}",
            failure.type,
            failure.code or "overloaded",
            retryable=True,
            kind="server_error",
        )
    if 400 <= status < 500:
        return UpstreamError.make(
            status,
            failure.message,
            failure.type,
            "model_not_found" if status == 404 else (failure.code or "invalid_request"),
            retryable=False,
            kind="client_error",
        )
    return UpstreamError.make(
        502,
        f"{where} failed with {what}: {failure.message}",
        "upstream_error",
        "upstream_error",
        retryable=True,
        kind="server_error",
    )


def _event_status(body: bytes) -> int:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 500
    error = data.get("error") if isinstance(data, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return dialect.STATUS_BY_ERROR_TYPE.get(kind, 500) if isinstance(kind, str) else 500


def _refused(instance: Instance, err: GatewayError) -> UpstreamError:
    """A request the translation refuses (a 400 naming the field): never retried, the
    next instance would refuse it too when it is Anthropic, and the caller must know."""
    return UpstreamError.make(
        err.status,
        err.message,
        err.type,
        err.code or "invalid_request",
        retryable=False,
        kind="client_error",
        param=err.param,
    )


def _bad_response(instance: Instance, what: str) -> UpstreamError:
    return UpstreamError.make(
        502,
        f"upstream {instance.id} {what}.",
        "upstream_error",
        "upstream_bad_response",
        retryable=True,
        kind="bad_response",
    )


class AnthropicStreamMeter:
    """Usage off native events, the events untouched: input (with cache reads and
    writes) from message_start, output from message_delta, whose usage is cumulative
    (set, never added)."""

    def __init__(self) -> None:
        self._usage: dict[str, Any] = {}
        self._chunks = 0
        self._final = False  # a message_delta said the output's size

    def observe(self, payload: bytes) -> None:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "content_block_delta":
            self._chunks += 1
        elif kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._usage.update(usage)
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._usage.update({k: v for k, v in usage.items() if v is not None})
                self._final = True

    @property
    def usage(self) -> dict[str, Any] | None:
        if not self._usage:
            return None
        usage = self._usage
        if not self._final:
            # Cut before message_delta: message_start's output count is a placeholder;
            # what was relayed, a delta a token, is billed instead.
            reported = usage.get("output_tokens")
            counted = reported if isinstance(reported, int) and not isinstance(reported, bool) else 0
            usage = {**usage, "output_tokens": max(self._chunks, counted)}
        return dialect.chat_usage(usage)

    @property
    def chunks(self) -> int:
        return self._chunks


class AnthropicConnector:
    native_dialect = dialect.DIALECT

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _headers(
        instance: Instance, trace_headers: Mapping[str, str], request_id: str, native: Mapping[str, str]
    ) -> dict[str, str]:
        headers = {"X-Request-Id": request_id, **trace_headers, "Content-Type": "application/json"}
        passed = {k.lower(): v for k, v in native.items()}
        # Only Anthropic's own headers are the caller's to choose; everything else
        # (credentials above all) is the gateway's.
        for name in dialect.NATIVE_HEADERS:
            if passed.get(name):
                headers[name] = passed[name]
        headers.setdefault("anthropic-version", dialect.DEFAULT_ANTHROPIC_VERSION)
        if instance.api_key:
            headers["x-api-key"] = instance.api_key
        return headers

    @staticmethod
    def _translate(instance: Instance, body: dict[str, Any], stream: bool) -> bytes:
        try:
            request = dialect.chat_to_anthropic(body)
        except GatewayError as err:
            raise _refused(instance, err) from None
        request["model"] = instance.upstream_model
        if stream:
            request["stream"] = True
        else:
            request.pop("stream", None)
        return orjson.dumps(request)

    @staticmethod
    def _passed(instance: Instance, native: NativeRequest, stream: bool) -> bytes:
        try:
            # The gateway's own options (the body's "clawdbot" field) never reach a provider.
            return passed_body(native.body, instance.upstream_model, stream, drop=(GATEWAY_FIELD,))
        except NotAnObject as exc:
            raise UpstreamError.make(
                400,
                f"The request body is not a JSON object ({exc}).",
                "invalid_request_error",
                "invalid_request",
                retryable=False,
                kind="client_error",
            ) from exc

    async def _post(
        self,
        instance: Instance,
        payload: bytes,
        headers: dict[str, str],
        timeout_s: float,
    ) -> bytes:
        url = instance.base_url + _MESSAGES_PATH
        try:
            async with self._client().post(
                url, data=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise map_status(instance, resp.status, raw, resp.headers)
                return raw
        except TimeoutError as exc:
            raise UpstreamError.timed_out(instance, timeout_s) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError.unreachable(instance, exc) from exc

    @staticmethod
    def _message(instance: Instance, raw: bytes) -> dict[str, Any]:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _bad_response(instance, "answered with invalid JSON") from exc
        if not isinstance(data, dict) or data.get("type") != "message":
            raise _bad_response(instance, "answered with something other than a Message")
        return data

    # --- the Connector interface (Chat in, Chat out) -----------------------------------

    async def call(
        self,
        instance: Instance,
        task: str,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
        binary: bytes = b"",
    ) -> Answer:
        if task != "chat":
            raise _refused(instance, GatewayError.bad_request(f"An Anthropic model does not serve {task} requests."))
        payload = self._translate(instance, body, stream=False)
        raw = await self._post(instance, payload, self._headers(instance, trace_headers, request_id, {}), timeout_s)
        return Answer(dialect.message_to_chat(self._message(instance, raw), instance.upstream_model))

    async def stream(
        self,
        instance: Instance,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> AsyncIterator[bytes]:
        """Chat chunks decoded from Anthropic's events, the usage chunk always last (the
        router withholds it when the client did not ask for usage)."""
        payload = self._translate(instance, body, stream=True)
        headers = self._headers(instance, trace_headers, request_id, {})
        decoder = dialect.AnthropicChunkDecoder(model=instance.upstream_model, include_usage=True)
        async for _, data in self._events(instance, payload, headers, timeout_s):
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise _bad_response(instance, "sent an event that is not JSON") from exc
            try:
                chunks = decoder.feed(event) if isinstance(event, dict) else []
            except GatewayError as err:
                raise _bad_response(instance, f"sent an event out of order ({err.message})") from None
            for chunk in chunks:
                yield orjson.dumps(chunk)

    # --- native (pass-through) ----------------------------------------------------------

    async def call_native(
        self,
        instance: Instance,
        native: NativeRequest,
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> Answer:
        payload = self._passed(instance, native, stream=False)
        headers = self._headers(instance, trace_headers, request_id, native.headers)
        raw = await self._post(instance, payload, headers, timeout_s)
        return Answer(self._message(instance, raw), raw=raw)

    async def stream_native(
        self,
        instance: Instance,
        native: NativeRequest,
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> AsyncIterator[bytes]:
        payload = self._passed(instance, native, stream=True)
        headers = self._headers(instance, trace_headers, request_id, native.headers)
        async for _, data in self._events(instance, payload, headers, timeout_s):
            yield data

    def native_usage(self, data: dict[str, Any]) -> dict[str, Any] | None:
        usage = data.get("usage")
        return dialect.chat_usage(usage) if isinstance(usage, dict) else None

    def stream_meter(self) -> AnthropicStreamMeter:
        return AnthropicStreamMeter()

    async def _events(
        self, instance: Instance, payload: bytes, headers: dict[str, str], timeout_s: float
    ) -> AsyncIterator[tuple[str, bytes]]:
        """(event name, data) of each event up to message_stop, the preamble held back
        until something follows it. An `error` event raises its UpstreamError (retryable
        while nothing was yielded); a stream cut before message_stop is `truncated`."""
        url = instance.base_url + _MESSAGES_PATH
        # Between reads, not for the whole answer: a long answer is fine, a stall is not.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        started = False
        held: list[tuple[str, bytes]] = []
        parser = dialect.SseParser()
        try:
            async with self._client().post(url, data=payload, headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    raise map_status(instance, resp.status, await resp.read(), resp.headers)
                async for piece in resp.content.iter_any():
                    for name, data in parser.feed(piece):
                        if name == "error":
                            raise map_status(instance, 0, data, {})
                        if not started and name in _PREAMBLE:
                            held.append((name, data))
                            continue
                        started = True
                        for early in held:
                            yield early
                        held.clear()
                        yield name, data
                        if name == "message_stop":
                            return
                for name, data in parser.close():
                    if name == "error":
                        raise map_status(instance, 0, data, {})
                raise UpstreamError.make(
                    502,
                    f"upstream {instance.id} ended the stream before message_stop.",
                    "upstream_error",
                    "upstream_stream_truncated",
                    retryable=True,
                    kind="truncated",
                )
        except UpstreamError as exc:
            exc.retryable = exc.retryable and not started
            raise
        except TimeoutError as exc:
            err = UpstreamError.timed_out(instance, timeout_s)
            err.retryable = not started
            raise err from exc
        except aiohttp.ClientError as exc:
            err = UpstreamError.unreachable(instance, exc)
            err.retryable = not started
            raise err from exc
