"""Virtual keys through Envoy: the admin API (REST and its gRPC twins), a created key that
works at once with the official openai SDK, a key held to `mock-*` refused every other
model on every route (403 model_not_allowed, before anything is called), and a revoked key
refused within a second, on the replica that revoked it and on another one following the
same database (an in-test VirtualKeys, as a second adapter would)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import websockets
from google.protobuf import json_format

from clawdbot.adapter.virtual_keys import VirtualKeys
from clawdbot.common.errors import GatewayError
from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import Mesh, core_mesh_config, running_mesh
from tests.support import handmade_wav, wait_for

pytestmark = pytest.mark.e2e

REVOKED_WITHIN_S = 1.0
USER_KEY_ENV = "CLAWDBOT_TEST_VK_USER_KEY"
USER_KEY = "sk-static-user-not-admin"


@pytest.fixture(scope="module")
def keys_mesh(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("virtual-keys")
    models = [
        {"name": "mock-1", "task": "chat", "base_url": mock_upstream},
        {"name": "mock-embed", "task": "embeddings", "base_url": mock_upstream},
        # Models a key held to `mock-*` may not use.
        {"name": "other-chat", "task": "chat", "base_url": mock_upstream, "upstream_model": "mock-1"},
        {"name": "other-embed", "task": "embeddings", "base_url": mock_upstream, "upstream_model": "mock-embed"},
        {"name": "other-tts", "task": "speech", "base_url": mock_upstream},
        {"name": "other-whisper", "task": "transcription", "base_url": mock_upstream},
    ]
    config = core_mesh_config(
        mock_upstream,
        tmp,
        models=models,
        auth={"keys": [{"name": "user", "key_env": USER_KEY_ENV, "role": "user"}]},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(USER_KEY_ENV, USER_KEY)
        with running_mesh(tmp, config, mock_upstream) as mesh:
            yield mesh


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sdk(mesh: Mesh, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.v1, api_key=key, max_retries=0, timeout=60)


def create(mesh: Mesh, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    return httpx.post(f"{mesh.v1}/admin/keys", headers=auth(key or mesh.api_key), json=body, timeout=30)


def created(mesh: Mesh, body: dict[str, Any]) -> dict[str, Any]:
    reply = create(mesh, body)
    assert reply.status_code == 201, reply.text
    key: dict[str, Any] = reply.json()
    return key


def chat_body(model: str = "mock-1", text: str = "hi") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def test_an_admin_creates_a_key_that_works_at_once(keys_mesh: Mesh) -> None:
    reply = create(keys_mesh, {"name": "laptop", "metadata": {"owner": "me"}})
    assert reply.status_code == 201, reply.text
    key = reply.json()
    assert key["id"].startswith("key_") and key["key"].startswith("sk-cb-")
    assert reply.headers["location"] == f"/v1/admin/keys/{key['id']}"
    assert key["name"] == "laptop" and key["models"] == [] and key["revoked_at"] is None
    # Works at once, with the official SDK.
    answer = sdk(keys_mesh, key["key"]).chat.completions.create(**chat_body(text="first call"))
    assert answer.choices[0].message.content == "Hello from mock-1: first call"

    listed = httpx.get(f"{keys_mesh.v1}/admin/keys", headers=auth(keys_mesh.api_key), timeout=30)
    assert listed.status_code == 200, listed.text
    mine = [k for k in listed.json()["data"] if k["id"] == key["id"]]
    assert len(mine) == 1 and mine[0]["prefix"] == key["prefix"]
    # No secret in a list, nor its hash.
    assert "key" not in mine[0] and key["key"] not in listed.text and key["key"][6:] not in listed.text

    got = httpx.get(f"{keys_mesh.v1}/admin/keys/{key['id']}", headers=auth(keys_mesh.api_key), timeout=30)
    assert got.status_code == 200, got.text
    assert got.json()["metadata"] == {"owner": "me"} and isinstance(got.json()["spend"], dict)
    assert "key" not in got.json()

    patched = httpx.patch(
        f"{keys_mesh.v1}/admin/keys/{key['id']}",
        headers=auth(keys_mesh.api_key),
        json={"name": "laptop-2", "models": ["mock-*"]},
        timeout=30,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["name"] == "laptop-2" and patched.json()["models"] == ["mock-*"]
    # The change holds at once on this replica: the key is now held to mock-*.
    with pytest.raises(openai.PermissionDeniedError):
        sdk(keys_mesh, key["key"]).chat.completions.create(**chat_body("other-chat"))


@pytest.mark.asyncio
async def test_the_grpc_twins_manage_keys(keys_mesh: Mesh) -> None:
    metadata = (("authorization", f"Bearer {keys_mesh.api_key}"),)
    async with grpc.aio.insecure_channel(keys_mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.CreateKeyRequest(name="grpc-made", models=["mock-*"])
        request.budget.update({"usd": 5, "period": "month"})
        made = json_format.MessageToDict(await stub.CreateKey(request, metadata=metadata, timeout=30))
        assert made["key"].startswith("sk-cb-") and made["models"] == ["mock-*"]
        assert made["budget"] == {"usd": 5.0, "period": "month"}
        got = json_format.MessageToDict(
            await stub.GetKey(gateway_pb2.KeyRequest(id=made["id"]), metadata=metadata, timeout=30)
        )
        assert got["id"] == made["id"] and "key" not in got and got["spend"] == {}
        changes = gateway_pb2.UpdateKeyRequest(id=made["id"])
        changes.changes.update({"max_parallel": 3})
        updated = json_format.MessageToDict(await stub.UpdateKey(changes, metadata=metadata, timeout=30))
        assert updated["max_parallel"] == 3
        listed = json_format.MessageToDict(
            await stub.ListKeys(gateway_pb2.ListKeysRequest(), metadata=metadata, timeout=30)
        )
        assert made["id"] in [k["id"] for k in listed["data"]]
        revoked = json_format.MessageToDict(
            await stub.RevokeKey(gateway_pb2.KeyRequest(id=made["id"]), metadata=metadata, timeout=30)
        )
        assert revoked["revoked_at"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetKey(gateway_pb2.KeyRequest(id="key_nope"), metadata=metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def assert_model_not_allowed(error: dict[str, Any]) -> None:
    assert error["code"] == "model_not_allowed", error
    assert error["type"] == "permission_error" and error["param"] == "model"


@pytest.mark.asyncio
async def test_a_key_held_to_mock_models_gets_403_for_any_other(keys_mesh: Mesh) -> None:
    limited = created(keys_mesh, {"name": "phone", "models": ["mock-*"]})["key"]
    client = sdk(keys_mesh, limited)
    # Its own models work.
    assert client.chat.completions.create(**chat_body()).choices[0].message.content == "Hello from mock-1: hi"
    assert len(client.embeddings.create(model="mock-embed", input="x").data) == 1
    # Every refused call carries this, and none may reach the provider.
    marker = f"refused-{uuid.uuid4().hex}"

    # Chat (SDK, plain and streamed), and a routing name the glob does not match.
    for model in ("other-chat", "auto"):
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client.chat.completions.create(**chat_body(model, marker))
        assert_model_not_allowed(denied.value.body)  # type: ignore[arg-type]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(**chat_body("other-chat", marker), stream=True)
    # Embeddings.
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.embeddings.create(model="other-embed", input=marker)
    assert_model_not_allowed(denied.value.body)  # type: ignore[arg-type]
    # Speech and transcription.
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.audio.speech.create(model="other-tts", voice="alloy", input=marker)
    assert_model_not_allowed(denied.value.body)  # type: ignore[arg-type]
    wav = handmade_wav(b"\x00\x00" * 1600)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.audio.transcriptions.create(model="other-whisper", file=("a.wav", wav), prompt=marker)
    assert_model_not_allowed(denied.value.body)  # type: ignore[arg-type]
    # The models it may use are the models it is shown.
    assert sorted(m.id for m in client.models.list()) == ["mock-1", "mock-embed"]
    # An async job: refused at submission.
    async with httpx.AsyncClient(timeout=30) as http:
        job = await http.post(
            f"{keys_mesh.v1}/jobs",
            headers=auth(limited),
            json={"kind": "chat", "request": chat_body("other-chat", marker)},
        )
    assert job.status_code == 403, job.text
    assert_model_not_allowed(job.json()["error"])
    # WebSocket.
    url = keys_mesh.url.replace("http://", "ws://") + "/v1/ws"
    async with websockets.connect(url, additional_headers=auth(limited)) as ws:
        await ws.send(json.dumps({"id": "w1", "body": chat_body("other-chat", marker)}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert frame["type"] == "error" and frame["id"] == "w1" and frame["status"] == 403, frame
        assert_model_not_allowed(frame["error"])
        await ws.send(json.dumps({"id": "w2", "body": chat_body("mock-1")}))
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] not in ("done", "error"):
            pass
        assert frame["type"] == "done", frame
    # Typed gRPC.
    async with grpc.aio.insecure_channel(keys_mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.ChatCompletionRequest(
            model="other-chat", messages=[gateway_pb2.ChatMessage(role="user", content=marker)]
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateChatCompletion(request, metadata=(("authorization", f"Bearer {limited}"),), timeout=30)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # None of the refused calls reached the provider.
    async with httpx.AsyncClient(timeout=10) as http:
        recorded = (await http.get(keys_mesh.mock_url.removesuffix("/v1") + "/_mock/requests")).json()
    assert recorded and not [r for r in recorded if marker in json.dumps(r)]


def test_only_admin_keys_use_the_admin_api(keys_mesh: Mesh) -> None:
    virtual_user = created(keys_mesh, {"name": "plain"})
    virtual_admin = created(keys_mesh, {"name": "ops", "admin": True})
    target = f"{keys_mesh.v1}/admin/keys/{virtual_user['id']}"
    for key in (USER_KEY, virtual_user["key"]):
        for method, url in (
            ("POST", f"{keys_mesh.v1}/admin/keys"),
            ("GET", f"{keys_mesh.v1}/admin/keys"),
            ("GET", target),
            ("PATCH", target),
            ("DELETE", target),
        ):
            reply = httpx.request(method, url, headers=auth(key), json={"name": "x"}, timeout=30)
            assert reply.status_code == 403, (method, url, reply.text)
            assert reply.json()["error"]["type"] == "permission_error"
        # And the typed twins: PERMISSION_DENIED.
        with grpc.insecure_channel(keys_mesh.grpc_target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListKeys(gateway_pb2.ListKeysRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=30)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # An admin virtual key is an admin key.
    listed = httpx.get(f"{keys_mesh.v1}/admin/keys", headers=auth(virtual_admin["key"]), timeout=30)
    assert listed.status_code == 200, listed.text


@pytest.mark.asyncio
async def test_a_revoked_key_is_refused_within_a_second_on_every_replica(keys_mesh: Mesh, tmp_path: Path) -> None:
    key = created(keys_mesh, {"name": "to-revoke"})
    client = sdk(keys_mesh, key["key"])
    assert client.chat.completions.create(**chat_body()).choices[0].message.content
    # A WebSocket opened with the key before it is revoked.
    url = keys_mesh.url.replace("http://", "ws://") + "/v1/ws"
    socket = await websockets.connect(url, additional_headers=auth(key["key"]))
    # A second replica: the adapter's own VirtualKeys on the mesh's database, following it.
    database = keys_mesh.config_file.parent / "state" / "clawdbot.db"
    replica = VirtualKeys(f"sqlite+aiosqlite:///{database}")
    following = asyncio.create_task(replica.run())
    try:
        assert (await replica.principal(key["key"])).key_id == key["id"]

        revoked = await asyncio.to_thread(
            httpx.delete, f"{keys_mesh.v1}/admin/keys/{key['id']}", headers=auth(keys_mesh.api_key), timeout=30
        )
        at = time.monotonic()
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["id"] == key["id"] and revoked.json()["revoked_at"]

        async def refused_by_replica() -> float:
            while True:
                try:
                    await replica.principal(key["key"])
                except GatewayError as err:
                    assert err.status == 401
                    return time.monotonic() - at
                await asyncio.sleep(0.02)

        took = await asyncio.wait_for(refused_by_replica(), 5)
        print(f"second replica refuses the revoked key after {took * 1000:.0f} ms")
        assert took < REVOKED_WITHIN_S
    finally:
        replica.stop()
        await following
        await replica.close()

    def refused_by_mesh() -> float | None:
        reply = httpx.post(f"{keys_mesh.v1}/chat/completions", headers=auth(key["key"]), json=chat_body(), timeout=30)
        return time.monotonic() - at if reply.status_code == 401 else None

    took = wait_for(refused_by_mesh, 5, "the revoked key to be refused")
    assert took < REVOKED_WITHIN_S + 1.0  # the replica's second above came first
    # The open WebSocket: its next frame is refused.
    async with socket:
        await socket.send(json.dumps({"id": "after", "body": chat_body()}))
        frame = json.loads(await asyncio.wait_for(socket.recv(), 30))
        assert frame["type"] == "error" and frame["status"] == 401 and frame["id"] == "after", frame
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(**chat_body())
    # Revoking again is harmless.
    async with httpx.AsyncClient(timeout=30) as http:
        again = await http.delete(f"{keys_mesh.v1}/admin/keys/{key['id']}", headers=auth(keys_mesh.api_key))
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x", "models": "mock-*"}, "models"),
        ({"name": "x", "budget": {"usd": -1, "period": "day"}}, "budget.usd"),
        ({"name": "x", "budget": {"usd": 1, "period": "week"}}, "budget.period"),
        ({"name": "x", "rate_limit": {"requests_per_minute": 0}}, "rate_limit.requests_per_minute"),
        ({"name": "x", "expires_at": "yesterday"}, "expires_at"),
        ({"name": "x", "admin": "yes"}, "admin"),
        ({"name": "x", "colour": "red"}, "colour"),
    ],
)
def test_a_bad_body_is_400_naming_the_param(keys_mesh: Mesh, body: dict[str, Any], param: str) -> None:
    reply = create(keys_mesh, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text


def test_bad_json_bad_patch_and_unknown_ids(keys_mesh: Mesh) -> None:
    admin = auth(keys_mesh.api_key)
    not_json = httpx.post(f"{keys_mesh.v1}/admin/keys", headers=admin, content=b"{nope", timeout=30)
    assert not_json.status_code == 400, not_json.text
    key = created(keys_mesh, {"name": "patch-me"})
    bad_patch = httpx.patch(f"{keys_mesh.v1}/admin/keys/{key['id']}", headers=admin, json={"secret": 1}, timeout=30)
    assert bad_patch.status_code == 400 and bad_patch.json()["error"]["param"] == "secret", bad_patch.text
    for method in ("GET", "PATCH", "DELETE"):
        reply = httpx.request(method, f"{keys_mesh.v1}/admin/keys/key_unknown", headers=admin, json={}, timeout=30)
        assert reply.status_code == 404, (method, reply.text)
        assert reply.json()["error"]["code"] == "key_not_found"
