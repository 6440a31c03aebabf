"""Admin routes and feedback, attacked with an ordinary (non-admin) key through Envoy.

A user key must not reload the configuration or list instances (REST or their gRPC
twins): 403 `permission_error`, gRPC PERMISSION_DENIED. Feedback counts once per
request, and only from the key that made it: another key's request id is as unknown as
one never seen (404), a second rating is 409. Each refusal comes within a second, a normal
request sent meanwhile is answered, and the services are the ones the mesh started with."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import empty_pb2

from clawdbot.common.errors import GatewayError
from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import Mesh, core_mesh_config, running_mesh

pytestmark = pytest.mark.e2e

REFUSED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 5.0
USER_KEY_ENV = "CLAWDBOT_TEST_PHONE_KEY"
USER_KEY = "sk-phone-user-not-admin"


def config(mock_url: str, tmp: Path) -> dict[str, Any]:
    """Envoy, adapter, router and cache; one chat model; one user key beside the admin's."""
    return core_mesh_config(mock_url, tmp, auth={"keys": [{"name": "phone", "key_env": USER_KEY_ENV, "role": "user"}]})


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("roles")
    with pytest.MonkeyPatch.context() as patch:
        # The key itself only ever sits in the environment; YAML names the variable.
        patch.setenv(USER_KEY_ENV, USER_KEY)
        with running_mesh(tmp, config(mock_upstream, tmp), mock_upstream) as mesh:
            yield mesh


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(mesh: Mesh, key: str, text: str = "hello") -> httpx.Response:
    body = {"model": "mock-1", "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{mesh.v1}/chat/completions", headers=headers(key), json=body, timeout=30)


def timed(call: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def test_a_user_key_gets_403_on_every_admin_route(roles: Mesh) -> None:
    before = roles.service_pids()
    for method, path in (("POST", "/admin/reload"), ("GET", "/admin/instances")):
        reply, took = timed(
            lambda m=method, p=path: httpx.request(m, f"{roles.v1}{p}", headers=headers(USER_KEY), json=None)
        )
        print(f"user {method} {path}: {reply.status_code} in {took * 1000:.1f} ms")
        assert reply.status_code == 403, reply.text
        assert reply.json()["error"]["type"] == "permission_error"
        assert took < REFUSED_WITHIN_S
    # The user key is a working key for everything else.
    answered, took = timed(lambda: chat(roles, USER_KEY))
    print(f"user chat meanwhile: {answered.status_code} in {took * 1000:.1f} ms")
    assert answered.status_code == 200 and took < ANSWERED_WITHIN_S
    # The admin key still does both.
    assert httpx.get(f"{roles.v1}/admin/instances", headers=headers(roles.api_key), timeout=30).status_code == 200
    reloaded = httpx.post(f"{roles.v1}/admin/reload", headers=headers(roles.api_key), json={}, timeout=60)
    assert reloaded.status_code == 200, reloaded.text
    assert roles.service_pids() == before


def test_a_user_key_gets_permission_denied_on_the_grpc_twins(roles: Mesh) -> None:
    async def attack() -> None:
        async with grpc.aio.insecure_channel(roles.grpc_target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            user = (("authorization", f"Bearer {USER_KEY}"),)
            admin = (("authorization", f"Bearer {roles.api_key}"),)
            for name, call in (
                ("ListInstances", lambda md: stub.ListInstances(empty_pb2.Empty(), metadata=md, timeout=30)),
                (
                    "ReloadConfig",
                    lambda md: stub.ReloadConfig(gateway_pb2.ReloadConfigRequest(), metadata=md, timeout=60),
                ),
            ):
                started = time.perf_counter()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(user)
                took = time.perf_counter() - started
                print(f"user gRPC {name}: {refused.value.code().name} in {took * 1000:.1f} ms")
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                error = GatewayError.from_rpc_error(refused.value, "adapter")
                assert (error.status, error.type) == (403, "permission_error")
                assert took < REFUSED_WITHIN_S
                await call(admin)  # the admin key may

    asyncio.run(attack())


def test_feedback_only_from_the_asking_key_and_only_once(roles: Mesh) -> None:
    before = roles.service_pids()
    mine = chat(roles, roles.api_key, "rate me once")
    assert mine.status_code == 200, mine.text
    request_id = mine.headers["x-request-id"]

    def feedback(key: str, rid: str, score: float = 0.0) -> tuple[httpx.Response, float]:
        return timed(
            lambda: httpx.post(
                f"{roles.v1}/feedback", headers=headers(key), json={"request_id": rid, "score": score}, timeout=30
            )
        )

    # Another key rating this request: as unknown as a request never made.
    stolen, took = feedback(USER_KEY, request_id)
    print(f"feedback from another key: {stolen.status_code} in {took * 1000:.1f} ms")
    assert stolen.status_code == 404 and took < REFUSED_WITHIN_S
    unknown, took = feedback(USER_KEY, "never-made")
    print(f"feedback for an unknown id: {unknown.status_code} in {took * 1000:.1f} ms")
    assert unknown.status_code == 404 and took < REFUSED_WITHIN_S
    assert stolen.json()["error"]["code"] == unknown.json()["error"]["code"] == "request_not_found"

    first, _ = feedback(roles.api_key, request_id, 1.0)
    assert first.status_code == 200, first.text
    again, took = feedback(roles.api_key, request_id, 1.0)
    print(f"second rating of one request: {again.status_code} in {took * 1000:.1f} ms")
    assert again.status_code == 409 and took < REFUSED_WITHIN_S
    assert again.json()["error"]["param"] == "request_id"

    # The same over gRPC.
    async def over_grpc() -> None:
        async with grpc.aio.insecure_channel(roles.grpc_target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.SubmitFeedbackRequest(request_id=request_id, score=1.0)
            for key, code in ((USER_KEY, grpc.StatusCode.NOT_FOUND), (roles.api_key, grpc.StatusCode.ABORTED)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.SubmitFeedback(request, metadata=(("authorization", f"Bearer {key}"),), timeout=30)
                assert refused.value.code() == code

    asyncio.run(over_grpc())
    answered, took = timed(lambda: chat(roles, USER_KEY))
    print(f"chat afterwards: {answered.status_code} in {took * 1000:.1f} ms")
    assert answered.status_code == 200 and took < ANSWERED_WITHIN_S
    assert roles.service_pids() == before
