"""Request metadata the adapter attaches to every request: who, from where, on what."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

from clawdbot.common.internal_auth import TOKEN_METADATA_KEY
from clawdbot.gen.v1 import router_pb2

# Order matters: the first family that matches wins (bots often claim to be browsers,
# and mobile browsers claim to be desktop ones too).
_BOT = re.compile(r"bot\b|crawler|spider|slurp|facebookexternalhit|headlesschrome|python-requests|scrapy", re.I)
_SDK = re.compile(
    r"^(openai/|OpenAI/|AsyncOpenAI/)|openai-python|openai-node|langchain|litellm|llama[-_]?index|"
    r"grpc-(python|go|java|node|c\+\+|dotnet)|grpc-python-asyncio|anthropic-|clawdbot-sdk",
    re.I,
)
_CLI = re.compile(
    r"^(curl|wget|httpie|grpcurl|xh|aria2|powershell|python-httpx|python-urllib|"
    r"websocat|wscat|python/\S+ websockets|Python/\S+ websockets)",
    re.I,
)
_MOBILE = re.compile(r"mobile|android|iphone|ipad|ipod|windows phone|opera mini|iemobile", re.I)
_BROWSER = re.compile(r"mozilla/|chrome/|safari/|firefox/|edg/|opera", re.I)


def device_type(user_agent: str) -> str:
    """sdk | cli | browser-desktop | browser-mobile | bot | unknown, from a User-Agent."""
    ua = user_agent.strip()
    if not ua:
        return "unknown"
    if _BOT.search(ua):
        return "bot"
    # CLI before SDK: grpcurl announces the gRPC library it is built on too.
    if _CLI.search(ua):
        return "cli"
    if _SDK.search(ua):
        return "sdk"
    if _BROWSER.search(ua):
        return "browser-mobile" if _MOBILE.search(ua) else "browser-desktop"
    return "unknown"


def client_ip(headers: Mapping[str, str], peer: str = "") -> str:
    """The caller's address.

    Behind Envoy, x-clawdbot-client-ip is the TCP peer, set by Envoy (overwriting
    anything the client sent). Otherwise the last X-Forwarded-For entry, the one the
    nearest proxy appended (earlier entries are whatever the client claimed), or the
    gRPC/HTTP peer itself.
    """
    direct = headers.get("x-clawdbot-client-ip", "")
    if direct:
        return direct
    forwarded = headers.get("x-forwarded-for", "")
    if forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()
    return _peer_host(peer)


def _peer_host(peer: str) -> str:
    # grpc peers look like "ipv4:127.0.0.1:5555" or "ipv6:[::1]:5555".
    if peer.startswith("ipv4:"):
        return peer[5:].rsplit(":", 1)[0]
    if peer.startswith("ipv6:"):
        return peer[5:].rsplit(":", 1)[0].strip("[]")
    return peer


# x-* headers that describe the hop, not the caller: not for routing rules. The internal
# credential (Envoy adds it) must never travel on in request metadata, spans or logs.
_HOP_HEADERS = frozenset(
    {"x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-clawdbot-client-ip", TOKEN_METADATA_KEY}
)


def rule_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's own x-* headers, which routing rules may match on."""
    return {
        k: v
        for k, v in headers.items()
        if k.startswith("x-") and k not in _HOP_HEADERS and not k.startswith("x-envoy-")
    }


def build_meta(
    headers: Mapping[str, str],
    protocol: str,
    key_id: str,
    peer: str = "",
    grant: router_pb2.KeyGrant | None = None,
) -> router_pb2.RequestMeta:
    """The request's metadata; `grant`: what the caller's key allows (the router and the
    jobs service hold every model call to it)."""
    user_agent = headers.get("user-agent", "")
    return router_pb2.RequestMeta(
        request_id=headers.get("x-request-id") or uuid.uuid4().hex,
        client_ip=client_ip(headers, peer),
        device_type=device_type(user_agent),
        api_key_id=key_id,
        protocol=protocol,
        user_agent=user_agent,
        strategy=headers.get("x-clawdbot-strategy", ""),
        headers=rule_headers(headers),
        cache_control=headers.get("cache-control", ""),
        grant=grant,
    )
