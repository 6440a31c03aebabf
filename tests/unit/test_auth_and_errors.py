import grpc
import pytest

from clawdbot.adapter.auth import Authenticator, Principal, key_id
from clawdbot.common.config import ConfigError
from clawdbot.common.errors import ERROR_METADATA_KEY, GatewayError


def test_valid_key_gives_its_id() -> None:
    auth = Authenticator(["k1", "k2"])
    assert auth.check("Bearer k2") == Principal(key_id("k2"), "admin")
    assert auth.check("bearer  k1 ") == Principal(key_id("k1"), "admin")
    assert "k1" not in key_id("k1")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic k1", "Bearer wrong", "k1"])
def test_bad_or_missing_key_is_401(header: str | None) -> None:
    with pytest.raises(GatewayError) as info:
        Authenticator(["k1"]).check(header)
    assert info.value.status == 401
    assert info.value.to_dict()["error"]["code"] == "invalid_api_key"


def test_no_key_configured_fails_fast() -> None:
    with pytest.raises(ConfigError, match="CLAWDBOT_API_KEY"):
        Authenticator([])


class _FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, trailing: tuple[tuple[str, bytes], ...] = ()) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details="boom")


def test_error_crosses_a_grpc_hop_intact() -> None:
    err = GatewayError(429, "slow down", "rate_limit_error", "rate_limit_exceeded", None, "7")
    rebuilt = GatewayError.from_rpc_error(_FakeRpcError(err.grpc_code(), err.trailing_metadata()), "router")
    assert rebuilt == err
    assert err.to_dict() == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    }
    assert ERROR_METADATA_KEY.endswith("-bin")


def test_transport_failures_map_to_http_statuses() -> None:
    assert GatewayError.from_rpc_error(_FakeRpcError(grpc.StatusCode.UNAVAILABLE), "router").status == 503
    assert GatewayError.from_rpc_error(_FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED), "router").status == 504
    assert GatewayError.from_rpc_error(_FakeRpcError(grpc.StatusCode.INTERNAL), "router").status == 500
