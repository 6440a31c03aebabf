"""The outbound address policy (common/url_policy.py): what a callback or webhook may reach,
URL spellings that parsers disagree on, the allowlist, and how URLs are logged."""

from __future__ import annotations

import ast
import ipaddress
from pathlib import Path

import pytest

from clawdbot.common.config import ConfigError, HealthConfig, JobsConfig, load_config
from clawdbot.common.url_policy import AddressPolicy, UrlRefused, check_url_syntax, parse_ip, redact_url

STRICT = AddressPolicy()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "0.0.0.0",
        "0.1.2.3",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.100.100.200",
        "192.0.0.8",
        "198.18.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::",
        "::1",
        "::127.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:a9fe:a9fe",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::7f00:1",
        "64:ff9b:1::808:808",
        "2002:a9fe:a9fe::",
        "2002:7f00:1::",
        # Teredo whose client (the obfuscated last 32 bits) is 127.0.0.1.
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
        "fd00:ec2::254",
        "fc00::1",
        "fe80::1",
        "fe80::1%eth0",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",  # documentation
    ],
)
def test_inward_addresses_are_refused(address: str) -> None:
    assert STRICT.address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"],
)
def test_public_addresses_and_their_wrappings_are_allowed(address: str) -> None:
    assert STRICT.address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("text", ["not-an-ip", "", "127.0.0.1:80", "localhost"])
def test_an_address_that_cannot_be_parsed_is_refused(text: str) -> None:
    assert STRICT.check_address_text(text) is not None


@pytest.mark.parametrize(
    ("host", "address"),
    [("2130706433", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"),
     ("0", "0.0.0.0"), ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"), ("169.254.169.254", "169.254.169.254")],
)  # fmt: skip
def test_legacy_spellings_are_read_as_the_address_they_reach(host: str, address: str) -> None:
    assert parse_ip(host) == ipaddress.ip_address(address)


def test_host_names_are_not_addresses() -> None:
    assert parse_ip("hooks.example.com") is None
    assert parse_ip("localhost") is None


def test_the_allowlist_takes_networks_addresses_and_host_names() -> None:
    policy = AddressPolicy.from_allowlist(["127.0.0.1", "10.0.0.0/8", "fd00::/8", "hooks.internal", "*.corp.example"])
    assert policy.address_refusal(ipaddress.ip_address("127.0.0.1")) is None
    # The same address in its IPv4-mapped spelling is the same target.
    assert policy.address_refusal(ipaddress.ip_address("::ffff:127.0.0.1")) is None
    assert policy.address_refusal(ipaddress.ip_address("127.0.0.2")) is not None
    assert policy.address_refusal(ipaddress.ip_address("10.9.8.7")) is None
    assert policy.address_refusal(ipaddress.ip_address("fd00::5")) is None
    assert policy.address_refusal(ipaddress.ip_address("169.254.169.254")) is not None
    assert policy.host_allowed("hooks.internal") and policy.host_allowed("HOOKS.internal.")
    assert policy.host_allowed("a.corp.example") and not policy.host_allowed("corp.example.evil")
    assert not policy.host_allowed("evil.example")


@pytest.mark.parametrize("entry", ["not a host", "10.0.0.0/33", "127.1", "http://x", ""])
def test_a_bad_allowlist_entry_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="neither"):
        AddressPolicy.from_allowlist([entry])


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
        "http://user:pass@example.com/",
        "http://@example.com/",
        "http://127.0.0.1\\@evil.com/",
        "http://evil.com\\@127.0.0.1/",
        "http://example.com /",
        "http://exa\tmple.com/",
        "http:///path",
        "http://example.com:99999/",
        "//example.com/",
    ],
)
def test_urls_that_cannot_be_requested_safely_are_refused(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url_syntax(url)


def test_a_plain_url_is_read_as_the_client_reads_it() -> None:
    assert check_url_syntax("https://hooks.example.com/services/T0/B0/xyz?x=1") == ("https", "hooks.example.com", 443)
    assert check_url_syntax("http://[::ffff:127.0.0.1]:81/") == ("http", "::ffff:7f00:1", 81)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T000/B000/XXXXSECRET", "https://hooks.slack.com"),
        ("http://user:secret@example.com:8080/hook?token=abc#frag", "http://example.com:8080"),
        ("http://[::1]:9901/x", "http://[::1]:9901"),
    ],
)
def test_urls_are_logged_without_path_query_or_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "SECRET" not in redact_url(url) and "secret" not in redact_url(url)


def test_the_allowlists_are_configuration() -> None:
    assert JobsConfig(callback_allow="127.0.0.1, hooks.internal").callback_allow == ("127.0.0.1", "hooks.internal")
    with pytest.raises(ValueError, match="callback_allow"):
        JobsConfig(callback_allow=["no such thing!"])
    with pytest.raises(ValueError, match="alert_allow"):
        HealthConfig(alert_allow=["no such thing!"])


def test_a_webhook_known_bad_without_dns_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "clawdbot.yaml"
    path.write_text("health:\n  alert_webhook: http://169.254.169.254/latest\n")
    with pytest.raises(ConfigError, match=r"alert_webhook points at 169\.254\.169\.254"):
        load_config(path, env={})
    path.write_text("health:\n  alert_webhook: http://127.0.0.1:9/hook\n  alert_allow: [127.0.0.1]\n")
    assert load_config(path, env={}).health.alert_allow == ("127.0.0.1",)


# The packages that request URLs users or the configuration give (job callbacks, alert
# webhooks) reach the network only through common/guarded_http.py.
GUARDED_PACKAGES = ("jobs", "health")
HTTP_CLIENTS = ("aiohttp", "httpx", "requests", "urllib3", "urllib.request", "http.client")


def test_callbacks_and_webhooks_have_no_http_client_but_the_guarded_one() -> None:
    services = Path(__file__).resolve().parents[2] / "services" / "clawdbot"
    found = []
    for package in GUARDED_PACKAGES:
        for path in sorted((services / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in HTTP_CLIENTS or n in HTTP_CLIENTS]
    assert found == []
