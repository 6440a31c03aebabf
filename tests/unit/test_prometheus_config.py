"""The Prometheus scrape configuration: what it scrapes, that Prometheus accepts it, and
that the checked-in deploy/prometheus/prometheus.yml is the rendering for the defaults."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from clawdbot.common.config import Config, service_sections
from clawdbot.runner import prometheus
from clawdbot.runner.prometheus import DEFAULT_OUTPUT, default_rendering, mesh_targets, render, write
from tests.support import REPO_ROOT


def promtool_check(path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make setup` installs the prometheus package"
    checked = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_checked_in_config_is_current() -> None:
    assert DEFAULT_OUTPUT.read_text() == default_rendering(), (
        "deploy/prometheus/prometheus.yml is stale: run `python -m clawdbot.runner.prometheus`"
    )
    promtool_check(DEFAULT_OUTPUT)


def test_default_config_scrapes_every_service_and_envoy() -> None:
    document = yaml.safe_load(DEFAULT_OUTPUT.read_text())
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    assert set(jobs) == {*service_sections(), "envoy"}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"] == [{"targets": ["127.0.0.1:9901"], "labels": {"process": "envoy"}}]
    assert jobs["adapter"]["static_configs"][0]["targets"] == ["127.0.0.1:7002"]
    assert jobs["health"]["static_configs"][0]["targets"] == ["127.0.0.1:7062"]
    assert all("metrics_path" not in job for name, job in jobs.items() if name != "envoy")


def test_every_job_consumer_is_a_target_of_its_own() -> None:
    config = Config.model_validate({"jobs": {"kafka_bootstrap": "127.0.0.1:9092", "consumers": 3}})
    targets = [t for t in mesh_targets(config, [7042, 40001, 40002]) if t.job == "jobs"]
    assert [(t.process, t.address) for t in targets] == [
        ("jobs-1", "127.0.0.1:7042"),
        ("jobs-2", "127.0.0.1:40001"),
        ("jobs-3", "127.0.0.1:40002"),
    ]
    document = yaml.safe_load(render(mesh_targets(config, [7042, 40001, 40002])))
    (jobs,) = [job for job in document["scrape_configs"] if job["job_name"] == "jobs"]
    assert len(jobs["static_configs"]) == 3


def test_services_the_config_does_not_run_are_left_out() -> None:
    config = Config.model_validate(
        {
            "jobs": {"enabled": False},
            "cache": {"enabled": False},
            "orchestrator": {"enabled": False},
            "health": {"enabled": False},
            "worker": {"models": []},
        }
    )
    assert [t.job for t in mesh_targets(config)] == ["adapter", "router", "envoy"]


def test_without_kafka_one_jobs_process_is_a_target() -> None:
    # Its in-process queue runs the jobs: the one jobs process, whatever jobs.consumers says.
    config = Config.model_validate({"jobs": {"kafka_bootstrap": "", "consumers": 3}})
    targets = [(t.process, t.address) for t in mesh_targets(config, [7042]) if t.job == "jobs"]
    assert targets == [("jobs-1", "127.0.0.1:7042")]


def test_runner_rendering_is_accepted_by_prometheus(tmp_path: Path) -> None:
    config = Config.model_validate({"gateway": {"admin_port": 19901}, "router": {"http_port": 17012}})
    written = write(mesh_targets(config, [17042, 17043]), tmp_path / "prometheus" / "prometheus.yml")
    promtool_check(written)
    text = written.read_text()
    assert "127.0.0.1:17012" in text and "127.0.0.1:19901" in text and "127.0.0.1:17043" in text
    argv = prometheus.argv("/usr/bin/prometheus", written, tmp_path / "data", 17090)
    assert f"--config.file={written}" in argv and "--web.listen-address=127.0.0.1:17090" in argv


def test_grafana_datasource_points_at_the_runners_prometheus() -> None:
    provisioning = REPO_ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
    (datasource,) = yaml.safe_load(provisioning.read_text())["datasources"]
    assert datasource["url"] == f"http://127.0.0.1:{prometheus.DEFAULT_PORT}"
    assert datasource["jsonData"]["timeInterval"] == f"{prometheus.SCRAPE_INTERVAL_S}s"
