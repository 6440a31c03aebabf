"""GET /v1/admin/spend through Envoy and its typed gRPC twin GetSpend: the ledger summed per
key, per model and per (key, model) over a window; admin keys only; bad parameters are
400s naming the parameter. The ledger rows are written straight into the mesh's key store
(as the router's ledger writer would), so the sums are known exactly."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from clawdbot.common.keystore import KeyStore
from clawdbot.common.keystore.reports import month_start
from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import Mesh, core_mesh_config, running_mesh

pytestmark = pytest.mark.e2e

USER_KEY_ENV = "CLAWDBOT_TEST_SPEND_USER_KEY"
USER_KEY = "sk-static-spend-user"


@dataclass(frozen=True)
class Spent:
    key_id: str
    model: str
    instance: str
    request_id: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    at: datetime


@pytest.fixture(scope="module")
def spend_mesh(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("admin-spend")
    config = core_mesh_config(
        mock_upstream, tmp, auth={"keys": [{"name": "user", "key_env": USER_KEY_ENV, "role": "user"}]}
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(USER_KEY_ENV, USER_KEY)
        with running_mesh(tmp, config, mock_upstream) as mesh:
            yield mesh


@pytest.fixture(scope="module")
def ledger(spend_mesh: Mesh) -> dict[str, Any]:
    """Two keys of this test's own (the mesh may bill its own calls too: rows are filtered
    by these ids), spend this month and last month."""
    now = datetime.now(UTC)
    this_month = max(month_start(now), now - timedelta(minutes=5))
    last_month = month_start(now) - timedelta(days=3)
    a, b = f"key_spend_a_{uuid.uuid4().hex[:8]}", f"key_spend_b_{uuid.uuid4().hex[:8]}"
    records = [
        Spent(a, "gpt-x", "gpt-x-1", "r1", 100, 50, 0.5, this_month),
        Spent(a, "mock-1", "mock-1", "r2", 10, 5, 0.125, this_month),
        Spent(b, "gpt-x", "gpt-x-1", "r1", 1000, 500, 2.0, this_month),
        Spent(a, "gpt-x", "gpt-x-1", "r0", 7, 7, 9.0, last_month),
    ]
    database = spend_mesh.config_file.parent / "state" / "clawdbot.db"

    async def write() -> None:
        store = await KeyStore.open(f"sqlite+aiosqlite:///{database}")
        try:
            await store.record_spends(records)
        finally:
            await store.close()

    asyncio.run(write())
    return {"a": a, "b": b, "last_month": last_month}


def get_spend(mesh: Mesh, key: str | None = None, **params: str) -> httpx.Response:
    return httpx.get(
        f"{mesh.v1}/admin/spend",
        params=params,
        headers={"Authorization": f"Bearer {key or mesh.api_key}"},
        timeout=30,
    )


def mine(rows: list[dict[str, Any]], ledger: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in rows if row.get("key_id") in (ledger["a"], ledger["b"])]


def test_spend_per_key_this_month_by_default(spend_mesh: Mesh, ledger: dict[str, Any]) -> None:
    reply = get_spend(spend_mesh)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["group_by"] == "key"
    assert datetime.fromisoformat(body["from"]) == month_start(datetime.now(UTC))
    assert mine(body["data"], ledger) == [
        {"key_id": ledger["b"], "requests": 1, "input_tokens": 1000, "output_tokens": 500, "cost_usd": 2.0},
        {"key_id": ledger["a"], "requests": 2, "input_tokens": 110, "output_tokens": 55, "cost_usd": 0.625},
    ]


def test_spend_per_model_and_per_key_and_model_over_a_window(spend_mesh: Mesh, ledger: dict[str, Any]) -> None:
    since = ledger["last_month"] - timedelta(seconds=1)
    reply = get_spend(spend_mesh, group_by="key,model", **{"from": str(int(since.timestamp()))})
    assert reply.status_code == 200, reply.text
    assert [(r["key_id"], r["model"], r["cost_usd"]) for r in mine(reply.json()["data"], ledger)] == [
        (ledger["a"], "gpt-x", 9.5),
        (ledger["b"], "gpt-x", 2.0),
        (ledger["a"], "mock-1", 0.125),
    ]
    # Only last month's row: to is exclusive, ISO 8601 accepted.
    until = (ledger["last_month"] + timedelta(seconds=1)).isoformat()
    reply = get_spend(spend_mesh, group_by="model", **{"from": since.isoformat(), "to": until})
    assert reply.status_code == 200, reply.text
    gpt = [row for row in reply.json()["data"] if row["model"] == "gpt-x"]
    assert gpt == [{"model": "gpt-x", "requests": 1, "input_tokens": 7, "output_tokens": 7, "cost_usd": 9.0}]


def test_bad_parameters_and_non_admin_keys_are_refused(spend_mesh: Mesh, ledger: dict[str, Any]) -> None:
    for params, param in (({"group_by": "instance"}, "group_by"), ({"from": "yesterday"}, "from"), ({"to": "x"}, "to")):
        reply = get_spend(spend_mesh, **params)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == param, reply.text
    refused = get_spend(spend_mesh, USER_KEY)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["type"] == "permission_error"


@pytest.mark.asyncio
async def test_the_grpc_twin(spend_mesh: Mesh, ledger: dict[str, Any]) -> None:
    admin = (("authorization", f"Bearer {spend_mesh.api_key}"),)
    async with grpc.aio.insecure_channel(spend_mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        report = await stub.GetSpend(gateway_pb2.GetSpendRequest(group_by="key,model"), metadata=admin, timeout=30)
        assert report.object == "list" and report.group_by == "key,model"
        rows = [row for row in report.data if row.key_id in (ledger["a"], ledger["b"])]
        assert [(r.key_id, r.model, r.requests, r.input_tokens, r.cost_usd) for r in rows] == [
            (ledger["b"], "gpt-x", 1, 1000, 2.0),
            (ledger["a"], "gpt-x", 1, 100, 0.5),
            (ledger["a"], "mock-1", 1, 10, 0.125),
        ]
        window = gateway_pb2.GetSpendRequest(**{"group_by": "model", "from": "2000-01-01", "to": "2000-02-01"})
        empty = await stub.GetSpend(window, metadata=admin, timeout=30)
        assert json_format.MessageToDict(empty)["from"] == "2000-01-01T00:00:00+00:00" and not empty.data
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetSpend(gateway_pb2.GetSpendRequest(group_by="nope"), metadata=admin, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetSpend(
                gateway_pb2.GetSpendRequest(), metadata=(("authorization", f"Bearer {USER_KEY}"),), timeout=30
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
