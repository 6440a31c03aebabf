"""The one HTTP client for URLs that a user or the configuration supplies (job callbacks,
alert webhooks, anything later). Nothing else may request such a URL.

What it guarantees, and why each is needed:
- Every connection attempt is checked at connect time against `AddressPolicy`: aiohttp's
  `socket_factory` sees the address of each attempt, literal-IP hosts included (a custom
  resolver is never asked about those), so neither DNS rebinding (public at submit,
  loopback at connect) nor the odd spellings of 127.0.0.1 slip past. An attempt to a
  refused address fails before any packet is sent.
- Redirects are never followed: a 3xx is a refusal (a public receiver answering 302 to
  http://127.0.0.1:9901/ is the classic bypass of a check made once).
- Bounded: connect and total time, response size; no proxy from the environment
  (`trust_env=False`, or HTTPS_PROXY would route around the check); no cookies kept; the
  body is not decompressed.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver

from clawdbot.common.url_policy import AddressPolicy, UrlRefused, check_url_syntax, parse_ip, redact_url

CONNECT_TIMEOUT_S = 5.0
TOTAL_TIMEOUT_S = 10.0
MAX_RESPONSE_BYTES = 64 * 1024
# How long a submit-time check waits for DNS before leaving it to the connect-time check.
RESOLVE_TIMEOUT_S = 2.0


class OutboundRefused(Exception):
    """The policy said no (the URL, every address it led to, or a redirect): retrying
    cannot help."""


class OutboundFailed(Exception):
    """The request was allowed but did not complete (unreachable, timed out, an oversized
    answer); `retryable` says whether trying again later may help."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class GuardedResponse:
    status: int
    body: bytes


@dataclass
class _Attempt:
    """One request's view of its connection attempts, shared with the socket factory (which
    runs in tasks copied from the request's context: the object, not the variable, is shared)."""

    host_allowed: bool
    tries: int = 0
    refused: list[str] = field(default_factory=list)


_attempt: ContextVar[_Attempt | None] = ContextVar("clawdbot_guarded_http_attempt", default=None)


class _AddressRefused(OSError):
    pass


async def check_url(url: str, policy: AddressPolicy, resolver: AbstractResolver | None = None) -> None:
    """Refuse (UrlRefused) what can be known bad before any request: not http(s),
    credentials in it, a parser-confusing spelling, a refused literal address, or a host
    name that resolves only to refused addresses. A name that does not resolve now is
    left to the connect-time check (DNS may be down for a moment)."""
    _, host, port = check_url_syntax(url)
    if policy.host_allowed(host):
        return
    literal = parse_ip(host)
    if literal is not None:
        why = policy.address_refusal(literal)
        if why:
            raise UrlRefused(f"points at a refused address ({literal}: {why})")
        return
    own = resolver is None
    active = resolver or aiohttp.ThreadedResolver()
    try:
        answers = await asyncio.wait_for(active.resolve(host, port, socket.AF_UNSPEC), RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError):
        return
    finally:
        if own:
            await active.close()
    reasons = [(a["host"], policy.check_address_text(a["host"])) for a in answers]
    if reasons and all(why for _, why in reasons):
        listed = ", ".join(f"{address} ({why})" for address, why in reasons)
        raise UrlRefused(f"resolves only to refused addresses: {listed}")


class GuardedHttpClient:
    def __init__(
        self,
        policy: AddressPolicy,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        total_timeout_s: float = TOTAL_TIMEOUT_S,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_connections: int = 64,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.policy = policy
        self._timeout = aiohttp.ClientTimeout(
            total=total_timeout_s, connect=connect_timeout_s, sock_connect=connect_timeout_s
        )
        self._max_response_bytes = max_response_bytes
        self._max_connections = max_connections
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        # Made on first use: aiohttp wants a running loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                socket_factory=self._socket,
                resolver=self._resolver or aiohttp.ThreadedResolver(),
                limit=self._max_connections,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                trust_env=False,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"user-agent": "clawdbot", "accept-encoding": "identity"},
            )
        return self._session

    def _socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """Called for every connection attempt, with the address about to be dialled."""
        family, type_, proto, _, address = addr_info
        attempt = _attempt.get()
        if attempt is None:
            # Only post() opens connections; anything else reusing the session is a bug.
            raise _AddressRefused(errno.EACCES, "connection outside a guarded request")
        attempt.tries += 1
        if not attempt.host_allowed:
            why = self.policy.check_address_text(str(address[0]))
            if why:
                attempt.refused.append(f"{address[0]} ({why})")
                raise _AddressRefused(errno.EACCES, f"address {address[0]} refused: {why}")
        return socket.socket(family, type_, proto)

    async def check_url(self, url: str) -> None:
        """check_url() with this client's resolver."""
        await check_url(url, self.policy, self._resolver)

    async def post(self, url: str, body: bytes, headers: dict[str, str] | None = None) -> GuardedResponse:
        """POST; the answer unless refused (OutboundRefused) or failed (OutboundFailed).
        A 3xx is refused, never followed."""
        try:
            _, host, _ = check_url_syntax(url)
            literal = parse_ip(host)
        except UrlRefused as exc:
            raise OutboundRefused(f"URL {exc}") from None
        host_allowed = self.policy.host_allowed(host)
        if literal is not None and not host_allowed and (why := self.policy.address_refusal(literal)):
            raise OutboundRefused(f"address {literal} refused: {why}")
        attempt = _Attempt(host_allowed)
        token = _attempt.set(attempt)
        try:
            async with self._session_now().post(url, data=body, headers=headers, allow_redirects=False) as resp:
                if 300 <= resp.status < 400:
                    raise OutboundRefused(f"redirect (HTTP {resp.status}) not followed")
                return GuardedResponse(resp.status, await self._read(resp))
        except aiohttp.ClientConnectorError as exc:
            if attempt.refused and len(attempt.refused) == attempt.tries:
                raise OutboundRefused("every address refused: " + ", ".join(attempt.refused)) from None
            raise OutboundFailed(f"cannot connect to {redact_url(url)}: {exc.os_error.strerror or exc}") from None
        except aiohttp.InvalidURL as exc:
            raise OutboundRefused(f"invalid URL: {type(exc).__name__}") from None
        except TimeoutError:
            raise OutboundFailed(f"timed out after {self._timeout.total} s") from None
        except aiohttp.ClientResponseError as exc:
            # Its str() carries the whole URL, which may hold a secret: status and message only.
            raise OutboundFailed(f"{type(exc).__name__}: {exc.status} {exc.message}") from None
        except aiohttp.ClientError as exc:
            raise OutboundFailed(type(exc).__name__) from None
        finally:
            _attempt.reset(token)

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(16 * 1024):
            size += len(chunk)
            if size > self._max_response_bytes:
                raise OutboundFailed(f"answer larger than {self._max_response_bytes} bytes", retryable=False)
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
