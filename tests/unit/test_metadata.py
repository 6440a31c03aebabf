import pytest

from clawdbot.adapter.metadata import build_meta, client_ip, device_type


@pytest.mark.parametrize(
    ("user_agent", "expected"),
    [
        ("OpenAI/Python 3.54.0", "sdk"),
        ("AsyncOpenAI/Python 3.54.0", "sdk"),
        ("grpc-python-asyncio/1.85.1 grpc-c/50.0.0 (linux; chttp2)", "sdk"),
        ("curl/8.5.0", "cli"),
        ("grpcurl/v1.9.4 grpc-go/1.83.2", "cli"),
        ("Python/3.11 websockets/17.4", "cli"),
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36",
            "browser-desktop",
        ),
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148 Safari/604.1",
            "browser-mobile",
        ),
        (
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/156.0 Mobile Safari/537.36",
            "browser-mobile",
        ),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
        ("", "unknown"),
        ("something-else/1.0", "unknown"),
    ],
)
def test_device_type(user_agent: str, expected: str) -> None:
    assert device_type(user_agent) == expected


def test_client_ip_trusts_only_the_hop_envoy_added() -> None:
    assert client_ip({"x-forwarded-for": "6.6.6.6, 10.1.2.3"}) == "10.1.2.3"
    assert client_ip({"x-forwarded-for": "127.0.0.1"}) == "127.0.0.1"
    assert client_ip({"x-clawdbot-client-ip": "127.0.0.1", "x-forwarded-for": "192.0.2.2"}) == "127.0.0.1"
    assert client_ip({}, "ipv4:192.168.0.7:5123") == "192.168.0.7"
    assert client_ip({}, "ipv6:[::1]:5123") == "::1"


def test_build_meta_keeps_envoy_request_id_or_makes_one() -> None:
    meta = build_meta(
        {"x-request-id": "abc", "user-agent": "curl/8", "x-clawdbot-strategy": "quality_first"}, "rest", "key_1"
    )
    assert (meta.request_id, meta.device_type, meta.api_key_id, meta.protocol, meta.strategy) == (
        "abc",
        "cli",
        "key_1",
        "rest",
        "quality_first",
    )
    assert len(build_meta({}, "grpc", "key_1").request_id) == 32
