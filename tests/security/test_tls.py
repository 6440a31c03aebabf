"""TLS on the public listener (gateway.tls): the test makes its own CA and server
certificate, starts a mesh with them, and speaks HTTPS (the openai SDK, HTTP/1.1 and
HTTP/2 by ALPN), gRPC over TLS and wss through Envoy; plaintext to the port gets nowhere."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import httpx2
import openai
import pytest
import websockets

from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import Mesh, core_mesh_config, running_mesh
from tests.support import Pki, make_pki

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class TlsMesh:
    mesh: Mesh
    pki: Pki

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.mesh.api_key}"}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[TlsMesh]:
    tmp = tmp_path_factory.mktemp("tls")
    pki = make_pki(tmp / "pki")
    config = core_mesh_config(
        mock_upstream, tmp, gateway={"tls": {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)}}
    )
    with running_mesh(tmp, config, mock_upstream) as mesh:
        yield TlsMesh(mesh, pki)


def test_the_ready_file_says_https(tls: TlsMesh) -> None:
    assert tls.mesh.url.startswith("https://127.0.0.1:")
    assert "https://" in tls.mesh.runner.output()


def test_openai_sdk_over_https(tls: TlsMesh) -> None:
    # The SDK's own HTTP client (httpx2), told to trust the test's CA.
    with httpx2.Client(verify=tls.pki.context()) as http:
        client = openai.OpenAI(base_url=tls.mesh.v1, api_key=tls.mesh.api_key, http_client=http, max_retries=0)
        reply = client.chat.completions.create(model="mock-1", messages=[{"role": "user", "content": "over tls"}])
        assert reply.choices[0].message.content == "Hello from mock-1: over tls"
        chunks = client.chat.completions.create(
            model="mock-1", messages=[{"role": "user", "content": "streamed"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hello from mock-1: streamed"


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_alpn_picks_the_protocol(tls: TlsMesh, http2: bool) -> None:
    with httpx.Client(verify=tls.pki.context(), http1=not http2, http2=http2) as client:
        reply = client.get(f"{tls.mesh.v1}/models", headers=tls.auth)
    assert reply.status_code == 200, reply.text
    assert reply.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert "mock-1" in {m["id"] for m in reply.json()["data"]}


@pytest.mark.asyncio
async def test_grpc_over_tls(tls: TlsMesh) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.pki.ca_pem)
    async with grpc.aio.secure_channel(tls.mesh.grpc_target, credentials) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        metadata = (("authorization", f"Bearer {tls.mesh.api_key}"),)
        models = await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata, timeout=30)
        assert "mock-1" in {m.id for m in models.data}
        request = gateway_pb2.ChatCompletionRequest(
            model="mock-1", messages=[gateway_pb2.ChatMessage(role="user", content="grpc tls")]
        )
        reply = await stub.CreateChatCompletion(request, metadata=metadata, timeout=30)
        assert reply.choices[0].message.content == "Hello from mock-1: grpc tls"


@pytest.mark.asyncio
async def test_websocket_over_wss(tls: TlsMesh) -> None:
    url = tls.mesh.url.replace("https://", "wss://") + "/v1/ws"
    async with websockets.connect(url, ssl=tls.pki.context(), additional_headers=tls.auth) as ws:
        body = {"model": "mock-1", "stream": False, "messages": [{"role": "user", "content": "wss"}]}
        await ws.send(json.dumps({"id": "t", "body": body}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert frame["type"] == "chat.completion", frame
    assert frame["data"]["choices"][0]["message"]["content"] == "Hello from mock-1: wss"


def test_plaintext_to_the_tls_port_gets_nowhere(tls: TlsMesh) -> None:
    plain = tls.mesh.url.replace("https://", "http://")
    start = time.perf_counter()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/v1/models", headers=tls.auth, timeout=10)
    elapsed = time.perf_counter() - start
    print(f"plaintext HTTP to the TLS port: failed after {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0

    async def plaintext_grpc() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(tls.mesh.grpc_target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gateway_pb2_grpc.GatewayStub(channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
        return info.value.code()

    assert asyncio.run(plaintext_grpc()) == grpc.StatusCode.UNAVAILABLE
    # And a client that does not trust the certificate's CA refuses the server.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls.mesh.v1}/models", headers=tls.auth, timeout=10)
