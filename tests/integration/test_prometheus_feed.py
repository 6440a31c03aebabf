"""A router that never called an instance scores it with the fleet's latency, read from a
real Prometheus that scrapes another router."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path

import orjson
import pytest

from clawdbot.common.config import Config
from clawdbot.common.service import internal_channel
from clawdbot.devtools.mock_upstream import start_mock
from clawdbot.gen.v1 import router_pb2, router_pb2_grpc
from clawdbot.router.server import create_server as create_router


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def router_config(mock_url: str, prometheus_url: str | None = None) -> Config:
    return Config.model_validate(
        {
            "router": {"grpc_port": 0, "http_port": 0},
            "models": [
                {"name": "shared", "base_url": mock_url, "upstream_model": "mock-1"},
                {"name": "other", "base_url": mock_url, "upstream_model": "mock-1"},
            ],
            "model_router": {"prometheus_url": prometheus_url, "prometheus_refresh_s": 0.5},
        }
    )


@pytest.mark.asyncio
async def test_unmeasured_instance_takes_the_fleet_latency(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make setup` installs the Debian package"
    mock, mock_port = await start_mock()
    mock_url = f"http://127.0.0.1:{mock_port}/v1"
    worker = create_router(router_config(mock_url), config_source=tmp_path / "none.yaml")
    await worker.start()
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: router\n    static_configs: [{{targets: ['127.0.0.1:{worker.http_port}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    prometheus = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    fresh = create_router(router_config(mock_url, f"http://127.0.0.1:{prom_port}"), config_source=tmp_path / "n.yaml")
    await fresh.start()
    stop = asyncio.Event()

    async def traffic() -> None:
        async with internal_channel(f"127.0.0.1:{worker.grpc_port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            body = {"model": "shared", "messages": [{"role": "user", "content": "x"}], "mock": {"delay_ms": 40}}
            while not stop.is_set():
                await stub.Complete(
                    router_pb2.ModelRequest(task="chat", model="shared", openai_json=orjson.dumps(body))
                )

    load = asyncio.create_task(traffic())
    try:
        async with internal_channel(f"127.0.0.1:{fresh.grpc_port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            deadline = time.monotonic() + 90
            while True:
                explained = await stub.Explain(router_pb2.ExplainRequest(model="auto"))
                shared = next(c for c in explained.candidates if c.instance == "shared")
                if shared.latency_source == "prometheus":
                    break
                assert time.monotonic() < deadline, f"no fleet figures; prometheus log:\n{log.name}"
                await asyncio.sleep(0.5)
            other = next(c for c in explained.candidates if c.instance == "other")
            assert 0.03 < shared.expected_latency_s < 2.0, shared
            assert shared.qps > 0 and not shared.cold
            assert other.latency_source == "prior" and other.cold  # nobody called it
    finally:
        stop.set()
        await asyncio.gather(load, return_exceptions=True)
        prometheus.terminate()
        await asyncio.wait_for(prometheus.wait(), 30)
        log.close()
        await fresh.stop(grace=1, drain_notice=0)
        await worker.stop(grace=1, drain_notice=0)
        await mock.cleanup()
