"""The shipped Grafana dashboards and their provisioning: well-formed JSON, unique ids,
queries that parse as PromQL (promtool checks them) and name only metrics that exist.
(tests/e2e/test_prometheus_grafana.py runs every query against a real Prometheus.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO_ROOT

GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
SOURCES = REPO_ROOT / "services" / "clawdbot"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$model_instance": ".*"}

# What the PromQL grammar names that is no metric.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
# Suffixes prometheus_client adds to a counter's or histogram's name.
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
# Series that come from elsewhere than Clawdbot's code: Prometheus's own and Envoy's.
_FOREIGN = re.compile(r"^(up|envoy_[a-z0-9_]+)$")


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"{panel['title']} {target['refId']}", target["expr"])
        for panel in all_panels(board)
        for target in panel.get("targets", [])
    ]


def substituted(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        name, rest = match.group(), text[match.end() :]
        if name in _KEYWORDS or rest.lstrip().startswith("("):  # a function call
            continue
        names.add(name)
    return names


def balanced(expr: str) -> bool:
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack


def exported_metrics() -> str:
    """Every Python source of the services, where each metric is registered by name."""
    return "\n".join(p.read_text() for p in SOURCES.rglob("*.py") if "gen" not in p.relative_to(SOURCES).parts)


def test_the_dashboards_are_there() -> None:
    names = {p.stem for p in DASHBOARD_FILES}
    assert {"clawdbot-traffic", "clawdbot-health", "clawdbot-cache-jobs"} <= names


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_is_well_formed(path: Path) -> None:
    board = load(path)
    assert board["uid"] == path.stem and board["title"]
    assert board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in all_panels(board)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in all_panels(board):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "table"}, panel["type"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_panel_titles_are_unique_across_dashboards() -> None:
    titles = [(p.stem, panel["title"]) for p in DASHBOARD_FILES for panel in all_panels(load(p))]
    assert len(titles) == len(set(titles))
    uids = [load(p)["uid"] for p in DASHBOARD_FILES]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_queries_name_only_metrics_the_code_exports(path: Path) -> None:
    source = exported_metrics()
    board = load(path)
    queries = exprs(board)
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            assert variable["definition"].startswith("label_values("), variable
            queries.append((f"${variable['name']}", variable["definition"].split("(", 1)[1].split(",")[0]))
    for where, expr in queries:
        assert balanced(expr), f"{where}: unbalanced brackets in {expr}"
        assert "$" not in substituted(expr), f"{where}: unknown variable in {expr}"
        names = metric_names(substituted(expr))
        assert names, f"{where}: reads no metric: {expr}"
        for name in names:
            if _FOREIGN.match(name):
                continue
            base = next((name.removesuffix(s) for s in _SUFFIXES if name.endswith(s)), name)
            assert f'"{base}"' in source, f"{where}: {name} is not a metric the services register ({expr})"


def test_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool (from the prometheus package) parses each one as a recording rule."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make setup` installs the prometheus package"
    rules = [
        {"record": f"dashboard_query_{i}", "expr": substituted(expr)}
        for i, (_, expr) in enumerate(e for p in DASHBOARD_FILES for e in exprs(load(p)))
    ]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_metric_name_reader_itself() -> None:
    expr = (
        'sum by (le, model_instance) (rate(gen_ai_x_bucket{model_instance=~".*", a="b"}[1m]))'
        " / on (job) group_left (x) up or vector(0)"
    )
    assert metric_names(expr) == {"gen_ai_x_bucket", "up"}
    assert balanced(expr) and not balanced("sum(rate(x[1m])")


def test_provisioning_points_at_the_dashboards() -> None:
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "clawdbot.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"].startswith("http")
