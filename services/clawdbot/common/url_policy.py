"""Which addresses an outbound request to a user- or config-supplied URL may reach, and
how such a URL is shown in logs.

The rule is "public internet only": an address is refused unless `ipaddress` calls it
global AND it falls in none of the ranges below. `is_global` alone is not enough: on
Python 3.11-3.13 it calls the NAT64 form of the metadata address (`64:ff9b::a9fe:a9fe`),
`::127.0.0.1` and (before 3.13) the 6to4 form `2002:a9fe:a9fe::` global, and
`::ffff:127.0.0.1` is not `is_loopback` before 3.13. So IPv6 forms that carry an IPv4
address (mapped, 6to4, NAT64, Teredo) are unwrapped and the IPv4 address inside is judged
instead. An operator who does want a private target lists it in an allowlist of CIDRs or
host names (`jobs.callback_allow`, `health.alert_allow`).

The checks here are pure; `common/guarded_http.py` applies them at connect time, to every
address a connection is attempted to, so DNS rebinding cannot slip past a check made earlier.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Refused whatever `is_global` says (some of these it calls global on some Python versions).
_REFUSED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "'this network' (0.0.0.0 reaches loopback on Linux)"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT / cloud metadata (100.100.100.200)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local / cloud metadata (169.254.169.254)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved / broadcast"),
    )
)
_REFUSED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        # :: and ::1 are in here, and the deprecated IPv4-compatible ::a.b.c.d, which
        # `is_global` passes for ::127.0.0.1: nobody routes them, so none is unwrapped.
        ("::/96", "unspecified / loopback / IPv4-compatible"),
        # RFC 8215 local-use NAT64: translated by the local network, so always inward.
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("fc00::/7", "unique-local (fd00:ec2::254 is cloud metadata)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

# What getaddrinfo/inet_aton (and so curl, urllib3, browsers) read as IPv4 although
# `ipaddress` refuses it: 2130706433, 0177.0.0.1, 127.1, 0x7f.1.
_LEGACY_V4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)
# A DNS name: letters, digits, hyphens and underscores in dot-separated labels.
_HOST_NAME = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class UrlRefused(ValueError):
    """A URL (or an address it leads to) that must not be requested; the message says why
    in words fit for the caller."""


def parse_ip(text: str) -> IPAddress | None:
    """The address a host string denotes when it is a literal (brackets, a zone id and the
    legacy IPv4 spellings included); None for a host name."""
    host = text.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_V4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            # Looks numeric but is no address at all (e.g. 999999999999): not a name either.
            raise UrlRefused(f"'{text}' is neither an IP address nor a host name") from None
    return None


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 one carries (and how), where packets to it reach that IPv4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.teredo is not None:
        return ip.teredo[1], "Teredo"
    return None


def refusal(ip: IPAddress) -> str | None:
    """Why an outbound connection to this address is refused; None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "a scoped (interface-local) IPv6 address"
        for net6, why in _REFUSED_V6:
            if ip in net6:
                return why
        inner = _embedded_v4(ip)
        if inner is not None:
            address, form = inner
            inner_why = refusal(address)
            # A wrapper of a public IPv4 address is as public as it (NAT64 is how IPv6-only
            # hosts reach the IPv4 internet); `is_global` of the wrapper itself is moot.
            return f"{form} form of {address}: {inner_why}" if inner_why else None
    else:
        for net4, why in _REFUSED_V4:
            if ip in net4:
                return why
    if not ip.is_global:
        return "not a public address"
    return None


def _allow_entry(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    text = entry.strip().lower()
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        pass
    name = text.rstrip(".")
    if not name or not _HOST_NAME.match(name) or _LEGACY_V4.match(name):
        raise ValueError(f"{entry!r} is neither a CIDR, an IP address nor a host name")
    return name


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses only, plus an operator's allowlist: networks (an address in one is
    allowed) and host names (a URL naming one may reach whatever it resolves to;
    `*.example.com` covers its subdomains)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def from_allowlist(cls, entries: Iterable[str]) -> AddressPolicy:
        """Raises ValueError naming a bad entry."""
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        hosts: set[str] = set()
        for entry in entries:
            parsed = _allow_entry(entry)
            if isinstance(parsed, str):
                hosts.add(parsed)
            else:
                networks.append(parsed)
        return cls(tuple(networks), frozenset(hosts))

    def host_allowed(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        if name in self.hosts:
            return True
        return any(h.startswith("*.") and name.endswith(h[1:]) for h in self.hosts)

    def address_refusal(self, ip: IPAddress) -> str | None:
        """None when a connection to this address may be made."""
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_v4(ip)) is not None:
            candidates.append(inner[0])
        if any(c.version == n.version and c in n for c in candidates for n in self.networks):
            return None
        return refusal(ip)

    def check_address_text(self, text: str) -> str | None:
        """As address_refusal, for an address as a socket gives it; what cannot be parsed is
        refused (an address we cannot judge is not one we connect to)."""
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return f"unparseable address {text!r}"
        return self.address_refusal(ip)


def check_url_syntax(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL fit to be requested, or UrlRefused.

    Parsers disagree on odd URLs (`http://127.0.0.1\\@evil.com/`: urllib says evil.com,
    urllib3 127.0.0.1, yarl refuses): aiohttp reads URLs with yarl, so yarl decides, and
    any URL that urllib reads differently is refused as ambiguous."""
    if any(ch.isspace() or ord(ch) < 0x20 or ch == "\\" for ch in url):
        raise UrlRefused("must not contain whitespace, control characters or backslashes")
    try:
        parsed = URL(url)
        host = parsed.raw_host
        port = parsed.port
    except (ValueError, TypeError) as exc:
        raise UrlRefused(f"is not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise UrlRefused("must be an http or https URL")
    if not host or port is None:
        raise UrlRefused("must name a host")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise UrlRefused("must not carry credentials (user:password@)")
    try:
        other = urlsplit(url)
        other_host = other.hostname
    except ValueError:
        raise UrlRefused("is ambiguous: URL parsers disagree on it") from None
    if other.username is not None or not _same_host(other_host or "", host):
        raise UrlRefused("is ambiguous: URL parsers disagree on its host")
    return parsed.scheme, host, port


def _same_host(one: str, other: str) -> bool:
    """Equal names, or two spellings of one address (yarl writes ::ffff:127.0.0.1 as
    ::ffff:7f00:1)."""
    a, b = one.lower().strip("[]"), other.lower().strip("[]")
    if a == b:
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """scheme://host:port of a URL, for logs: paths and queries of webhooks carry secrets
    (Slack-style hooks), and so may user:password@."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    scheme = parts.scheme or "?"
    return f"{scheme}://{host}:{port}" if port is not None else f"{scheme}://{host}"
