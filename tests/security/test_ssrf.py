"""SSRF through job callbacks (and anything else that requests a URL a user or the
configuration gives): the guarded client refuses every inward address at connect time,
follows no redirect and is bounded; `POST /v1/jobs` refuses what it can know is bad with a
400 naming `callback_url`; an allowlisted receiver gets its callback, signed; a receiver
that hangs delays no other job, on the in-process queue or on Kafka.

Receivers are real local servers; each one records every connection it is sent, so
"refused" means nothing reached it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from google.protobuf import json_format

from clawdbot.common.config import ConfigError, JobsConfig
from clawdbot.common.guarded_http import GuardedHttpClient, OutboundFailed, OutboundRefused, check_url
from clawdbot.common.url_policy import AddressPolicy, UrlRefused
from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc
from clawdbot.jobs.callbacks import SIGNATURE_HEADER, CallbackDelivery, callback_secret, sign
from clawdbot.jobs.records import Job
from tests.conftest import CALLBACK_SECRET, Mesh, core_mesh_config, running_mesh
from tests.support import wait_for_async

REFUSED_WITHIN_S = 1.0
ANSWERED_WITHIN_S = 5.0
# The address the SSRF mesh allows callbacks to: loopback, but not 127.0.0.1.
ALLOWED_HOST = "127.0.0.2"


# --- receivers ---------------------------------------------------------------------


@dataclass
class Receiver:
    """An HTTP server on one address that records every request: /hook answers 204,
    /redirect 302 to `redirect_to`, /big a body of 1 MiB."""

    host: str
    redirect_to: str = ""
    hits: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        async def hook(request: web.Request) -> web.StreamResponse:
            self.hits.append((request.path, await request.read(), dict(request.headers)))
            if request.path.startswith("/redirect"):
                raise web.HTTPFound(self.redirect_to)
            if request.path.startswith("/big"):
                return web.Response(body=b"x" * (1024 * 1024))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    def url(self, path: str = "/hook") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class Hanging:
    """A server that accepts connections and reads requests but never answers."""

    host: str
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> Hanging:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass

        self._server = await asyncio.start_server(hold, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()


@pytest_asyncio.fixture
async def loopback() -> AsyncIterator[tuple[Receiver, Receiver]]:
    """Receivers on 127.0.0.1 and ::1: what an SSRF would like to reach."""
    v4, v6 = await Receiver("127.0.0.1").start(), await Receiver("::1").start()
    yield v4, v6
    await v4.stop()
    await v6.stop()


class Answers(AbstractResolver):
    """A DNS stand-in: each name answers from its list, one entry per lookup (the last
    one repeated), so a name can resolve public first and loopback afterwards."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self._names = names
        self.lookups: dict[str, int] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = self._names.get(host)
        if answers is None:
            raise OSError(f"no such host {host}")
        n = self.lookups.get(host, 0)
        self.lookups[host] = n + 1
        address = answers[min(n, len(answers) - 1)]
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [{"hostname": host, "host": address, "port": port, "family": fam, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


# Every spelling of an inward target: {v4} and {v6} are the loopback receivers' ports.
INWARD_URLS = [
    "http://127.0.0.1:{v4}/hook",
    "http://[::1]:{v6}/hook",
    "http://127.1:{v4}/hook",
    "http://2130706433:{v4}/hook",
    "http://0177.0.0.1:{v4}/hook",
    "http://0x7f.0.0.1:{v4}/hook",
    "http://0.0.0.0:{v4}/hook",
    "http://0:{v4}/hook",
    "http://[::]:{v6}/hook",
    "http://[::ffff:127.0.0.1]:{v4}/hook",
    "http://[::127.0.0.1]:{v4}/hook",
    "http://localhost:{v4}/hook",
    "http://LOCALHOST:{v4}/hook",
    "http://10.0.0.1/hook",
    "http://172.16.0.1/hook",
    "http://192.168.0.1/hook",
    "http://[fe80::1]/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://[2002:a9fe:a9fe::]/latest/meta-data/",
    "http://100.100.100.200/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.64.0.1/hook",
    "http://224.0.0.1/hook",
]
# Known bad from the URL alone.
MALFORMED_URLS = [
    "http://127.0.0.1:{v4}\\@evil.com/",
    "http://user:password@example.com/hook",
    "ftp://example.com/hook",
    "gopher://127.0.0.1:{v4}/_hook",
    "file:///etc/passwd",
]


def inward(url: str, v4: Receiver, v6: Receiver) -> str:
    return url.format(v4=v4.port, v6=v6.port)


# --- the guarded client, directly ---------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("template", INWARD_URLS + MALFORMED_URLS)
async def test_the_guarded_client_refuses_inward_targets(template: str, loopback: tuple[Receiver, Receiver]) -> None:
    v4, v6 = loopback
    url = inward(template, v4, v6)
    client = GuardedHttpClient(AddressPolicy())
    try:
        start = time.perf_counter()
        with pytest.raises(OutboundRefused):
            await client.post(url, b"{}")
        elapsed = time.perf_counter() - start
        with pytest.raises(UrlRefused):
            await check_url(url, AddressPolicy())
    finally:
        await client.close()
    print(f"{url}: refused in {elapsed * 1000:.1f} ms")
    assert elapsed < REFUSED_WITHIN_S
    assert v4.hits == [] and v6.hits == []


@pytest.mark.asyncio
@pytest.mark.parametrize("address", ["127.0.0.1", "::ffff:127.0.0.1", "0.0.0.0", "169.254.169.254", "not-an-address"])
async def test_the_address_is_checked_when_connecting_not_only_when_resolving(
    address: str, loopback: tuple[Receiver, Receiver]
) -> None:
    """A name whose DNS answer is inward (and one that cannot be parsed) is refused by the
    socket factory, for the address the connection would have gone to."""
    v4, _ = loopback
    answers = Answers({"inward.example.com": [address]})
    client = GuardedHttpClient(AddressPolicy(), resolver=answers)
    try:
        with pytest.raises(OutboundRefused, match="refused"):
            await client.post(f"http://inward.example.com:{v4.port}/hook", b"{}")
    finally:
        await client.close()
    assert v4.hits == []


@pytest.mark.asyncio
async def test_dns_rebinding_is_refused_at_connect_time(loopback: tuple[Receiver, Receiver]) -> None:
    """Public when the submission is checked, loopback when the callback connects."""
    v4, _ = loopback
    answers = Answers({"rebind.example.com": ["93.184.216.34", "127.0.0.1"]})
    client = GuardedHttpClient(AddressPolicy(), resolver=answers)
    url = f"http://rebind.example.com:{v4.port}/hook"
    try:
        await client.check_url(url)  # what the submission saw: a public address
        with pytest.raises(OutboundRefused, match=r"127\.0\.0\.1 \(loopback\)"):
            await client.post(url, b"{}")
    finally:
        await client.close()
    assert answers.lookups["rebind.example.com"] == 2
    assert v4.hits == []


@pytest.mark.asyncio
async def test_a_redirect_to_loopback_is_not_followed(loopback: tuple[Receiver, Receiver]) -> None:
    inner, _ = loopback
    allowed = await Receiver(ALLOWED_HOST, redirect_to=inner.url("/inner")).start()
    client = GuardedHttpClient(AddressPolicy.from_allowlist([ALLOWED_HOST]))
    try:
        with pytest.raises(OutboundRefused, match=r"redirect \(HTTP 302\) not followed"):
            await client.post(allowed.url("/redirect"), b"{}")
    finally:
        await client.close()
        await allowed.stop()
    assert [path for path, _, _ in allowed.hits] == ["/redirect"]
    assert inner.hits == []


@pytest.mark.asyncio
async def test_an_allowlisted_host_name_reaches_its_private_address(loopback: tuple[Receiver, Receiver]) -> None:
    v4, _ = loopback
    answers = Answers({"hooks.example.com": ["127.0.0.1"], "other.example.com": ["127.0.0.1"]})
    client = GuardedHttpClient(AddressPolicy.from_allowlist(["hooks.example.com"]), resolver=answers)
    try:
        reply = await client.post(f"http://hooks.example.com:{v4.port}/hook", b"{}")
        assert reply.status == 204
        # The allowance is the name's, not the address's.
        with pytest.raises(OutboundRefused):
            await client.post(f"http://other.example.com:{v4.port}/hook", b"{}")
    finally:
        await client.close()
    assert [path for path, _, _ in v4.hits] == ["/hook"]


@pytest.mark.asyncio
async def test_time_and_size_are_bounded_and_proxies_from_the_environment_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allowed = await Receiver(ALLOWED_HOST).start()
    hanging = await Hanging(ALLOWED_HOST).start()
    proxy = await Receiver("127.0.0.1").start()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, proxy.url("/"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    client = GuardedHttpClient(
        AddressPolicy.from_allowlist([ALLOWED_HOST]), total_timeout_s=0.5, max_response_bytes=64 * 1024
    )
    try:
        assert (await client.post(allowed.url("/hook"), b"{}")).status == 204
        with pytest.raises(OutboundFailed, match="larger than"):
            await client.post(allowed.url("/big"), b"{}")
        start = time.perf_counter()
        with pytest.raises(OutboundFailed, match="timed out"):
            await client.post(hanging.url(), b"{}")
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
        await hanging.stop()
        await allowed.stop()
        await proxy.stop()
    print(f"a receiver that never answers: given up after {elapsed:.2f} s (bound 0.5 s)")
    assert elapsed < 0.5 + REFUSED_WITHIN_S
    assert proxy.hits == []


# --- callback delivery, in process --------------------------------------------------


def finished_job(callback_url: str) -> Job:
    return Job(id=f"job_{uuid.uuid4().hex}", kind="chat", api_key_id="k", request={}, callback_url=callback_url)


def test_callbacks_are_never_signed_without_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the jobs consumer and the in-process adapter build at start: no secret, no start.
    monkeypatch.delenv("CLAWDBOT_CALLBACK_SECRET", raising=False)
    with pytest.raises(ConfigError, match="CLAWDBOT_CALLBACK_SECRET"):
        CallbackDelivery.from_config(JobsConfig())
    with pytest.raises(ConfigError, match="CLAWDBOT_CALLBACK_SECRET"):
        callback_secret(JobsConfig(), env={})
    with pytest.raises(ConfigError, match="CLAWDBOT_CALLBACK_SECRET"):
        callback_secret(JobsConfig(), env={"CLAWDBOT_CALLBACK_SECRET": "  "})
    with pytest.raises(ConfigError):
        CallbackDelivery(GuardedHttpClient(AddressPolicy()), b"")


@pytest.mark.asyncio
async def test_a_hanging_receiver_holds_up_no_other_callback() -> None:
    allowed = await Receiver(ALLOWED_HOST).start()
    hanging = await Hanging(ALLOWED_HOST).start()
    client = GuardedHttpClient(AddressPolicy.from_allowlist([ALLOWED_HOST]), total_timeout_s=30)
    delivery = CallbackDelivery(client, b"secret", workers=4, per_destination=2)
    try:
        for _ in range(20):
            assert delivery.submit(finished_job(hanging.url()))
        await wait_for_async(lambda: _true(hanging.connections >= 2), 5, "the hanging receiver to be called")
        start = time.perf_counter()
        job = finished_job(allowed.url("/hook"))
        delivery.submit(job)
        await wait_for_async(lambda: _true(bool(allowed.hits)), ANSWERED_WITHIN_S, "the other callback")
        elapsed = time.perf_counter() - start
        # The hanging receiver got its share of workers and no more.
        assert hanging.connections == 2
    finally:
        await hanging.stop()
        await delivery.close(grace_s=0)
        await allowed.stop()
    print(f"callback delivered in {elapsed * 1000:.1f} ms while 20 others hang")
    assert elapsed < ANSWERED_WITHIN_S
    _, body, headers = allowed.hits[0]
    assert json.loads(body)["id"] == job.id
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], sign(b"secret", body))


async def _true(value: bool) -> bool | None:
    return value or None


# --- through Envoy --------------------------------------------------------------------


def ssrf_config(mock_url: str, tmp: Path) -> dict[str, Any]:
    """The lite mesh (jobs on the adapter's in-process queue) allowing callbacks to one
    loopback address, 127.0.0.2 — so every spelling of 127.0.0.1 must still be refused."""
    return core_mesh_config(
        mock_url, tmp, jobs={"kafka_bootstrap": "", "run_kafka": False, "callback_allow": [ALLOWED_HOST]}
    )


@pytest.fixture(scope="module")
def ssrf_mesh(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("ssrf")
    with running_mesh(tmp, ssrf_config(mock_upstream, tmp), mock_upstream) as mesh:
        yield mesh


def client(mesh: Mesh) -> httpx.AsyncClient:
    return httpx.AsyncClient(headers={"authorization": f"Bearer {mesh.api_key}"}, timeout=30)


def chat_job(text: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "chat", "request": {"model": "mock-1", "messages": [{"role": "user", "content": text}]}, **extra}


async def job_done(http: httpx.AsyncClient, mesh: Mesh, job_id: str, within_s: float) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        job = (await http.get(f"{mesh.v1}/jobs/{job_id}")).json()
        return job if job["status"] in ("succeeded", "failed") else None

    return await wait_for_async(done, within_s, f"job {job_id} to finish")


async def timed_models(http: httpx.AsyncClient, mesh: Mesh) -> float:
    start = time.perf_counter()
    reply = await http.get(f"{mesh.v1}/models")
    elapsed = time.perf_counter() - start
    assert reply.status_code == 200, reply.text
    return elapsed


def service_pids(mesh: Mesh) -> dict[str, int]:
    return {name: s["pid"] for name, s in mesh.info()["services"].items()}


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_inward_callback_urls_are_refused_at_submit(ssrf_mesh: Mesh, loopback: tuple[Receiver, Receiver]) -> None:
    v4, v6 = loopback
    pids = service_pids(ssrf_mesh)
    slowest = 0.0
    async with client(ssrf_mesh) as http:
        for template in INWARD_URLS + MALFORMED_URLS:
            url = inward(template, v4, v6)
            start = time.perf_counter()
            reply = await http.post(f"{ssrf_mesh.v1}/jobs", json=chat_job("ssrf", callback_url=url))
            elapsed = time.perf_counter() - start
            slowest = max(slowest, elapsed)
            assert reply.status_code == 400, f"{url}: {reply.status_code} {reply.text}"
            error = reply.json()["error"]
            assert error["param"] == "callback_url" and error["type"] == "invalid_request_error", reply.text
            assert elapsed < REFUSED_WITHIN_S, f"{url}: refused after {elapsed:.2f} s"
        normal = await timed_models(http, ssrf_mesh)
    print(f"{len(INWARD_URLS + MALFORMED_URLS)} callback URLs refused, slowest in {slowest * 1000:.1f} ms; "
          f"GET /v1/models meanwhile {normal * 1000:.1f} ms")  # fmt: skip
    assert normal < ANSWERED_WITHIN_S
    assert v4.hits == [] and v6.hits == []
    assert service_pids(ssrf_mesh) == pids


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_the_grpc_twin_refuses_them_too(ssrf_mesh: Mesh) -> None:
    request = gateway_pb2.SubmitJobRequest(kind="chat", callback_url="http://[::ffff:169.254.169.254]/latest/")
    json_format.ParseDict({"model": "mock-1", "messages": [{"role": "user", "content": "x"}]}, request.request)
    async with grpc.aio.insecure_channel(ssrf_mesh.grpc_target) as channel:
        start = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway_pb2_grpc.GatewayStub(channel).SubmitJob(
                request, metadata=(("authorization", f"Bearer {ssrf_mesh.api_key}"),), timeout=10
            )
        elapsed = time.perf_counter() - start
    print(f"gRPC SubmitJob refused in {elapsed * 1000:.1f} ms")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "callback_url" in (refused.value.details() or "")
    assert elapsed < REFUSED_WITHIN_S


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_an_allowlisted_receiver_gets_the_callback_signed_and_urls_stay_out_of_logs(ssrf_mesh: Mesh) -> None:
    allowed = await Receiver(ALLOWED_HOST).start()
    secret_path = f"/hook/T0/B0/{uuid.uuid4().hex}"
    try:
        async with client(ssrf_mesh) as http:
            reply = await http.post(
                f"{ssrf_mesh.v1}/jobs", json=chat_job("call me", callback_url=allowed.url(secret_path + "?token=t0k"))
            )
            assert reply.status_code == 202, reply.text
            job = reply.json()
            await wait_for_async(lambda: _true(bool(allowed.hits)), 30, "the callback")
    finally:
        await allowed.stop()
    path, body, headers = allowed.hits[0]
    assert path == secret_path
    expected = "sha256=" + hmac.new(CALLBACK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    assert json.loads(body)["id"] == job["id"]
    logs = ssrf_mesh.runner.output()
    assert f"http://{ALLOWED_HOST}:{allowed.port}" in logs  # logged, as scheme://host:port...
    assert secret_path.rsplit("/", 1)[1] not in logs and "t0k" not in logs  # ...and no more


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_a_redirect_to_loopback_is_a_failed_delivery(
    ssrf_mesh: Mesh, loopback: tuple[Receiver, Receiver]
) -> None:
    inner, _ = loopback
    allowed = await Receiver(ALLOWED_HOST, redirect_to=inner.url("/inner")).start()
    try:
        async with client(ssrf_mesh) as http:
            reply = await http.post(f"{ssrf_mesh.v1}/jobs", json=chat_job("x", callback_url=allowed.url("/redirect")))
            assert reply.status_code == 202, reply.text
            job_id = reply.json()["id"]

        def logged() -> bool | None:
            lines = [line for line in ssrf_mesh.runner.output().splitlines() if job_id in line]
            return any("job callback failed" in line and "redirect (HTTP 302)" in line for line in lines) or None

        await wait_for_async(lambda: _true(bool(logged())), 30, "the failed delivery in the log")
    finally:
        await allowed.stop()
    assert [path for path, _, _ in allowed.hits] == ["/redirect"]  # no retry of a refusal
    assert inner.hits == []


async def _hanging_does_not_delay_jobs(mesh: Mesh, hanging_host: str, stuck: int, others: int) -> float:
    """Submit `stuck` jobs whose callback hangs, then `others` plain ones: seconds until
    every plain one has finished (asserting they all did)."""
    hanging = await Hanging(hanging_host).start()
    try:
        async with client(mesh) as http:
            for _ in range(stuck):
                reply = await http.post(f"{mesh.v1}/jobs", json=chat_job("stuck", callback_url=hanging.url()))
                assert reply.status_code == 202, reply.text
            await wait_for_async(lambda: _true(hanging.connections >= 1), 30, "a callback to hang")
            start = time.perf_counter()
            ids = []
            for n in range(others):
                reply = await http.post(f"{mesh.v1}/jobs", json=chat_job(f"free {n}"))
                assert reply.status_code == 202, reply.text
                ids.append(reply.json()["id"])
            for job_id in ids:
                assert (await job_done(http, mesh, job_id, 60))["status"] == "succeeded"
            elapsed = time.perf_counter() - start
            normal = await timed_models(http, mesh)
    finally:
        await hanging.stop()
    print(
        f"{others} jobs finished in {elapsed:.2f} s while {stuck} callbacks hung "
        f"({hanging.connections} connections held); GET /v1/models {normal * 1000:.1f} ms"
    )
    assert normal < ANSWERED_WITHIN_S
    return elapsed


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_a_hanging_callback_delays_no_other_job_in_process(ssrf_mesh: Mesh) -> None:
    # More stuck callbacks than the in-process queue has workers (8): each used to hold one.
    elapsed = await _hanging_does_not_delay_jobs(ssrf_mesh, ALLOWED_HOST, stuck=12, others=5)
    assert elapsed < ANSWERED_WITHIN_S


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_a_hanging_callback_delays_no_other_job_over_kafka(mesh: Mesh) -> None:
    # The session mesh: two consumer processes; it allows callbacks to 127.0.0.1.
    elapsed = await _hanging_does_not_delay_jobs(mesh, "127.0.0.1", stuck=4, others=5)
    assert elapsed < ANSWERED_WITHIN_S
