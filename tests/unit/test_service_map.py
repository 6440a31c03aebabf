"""README's table of who calls whom is the one the code gives."""

from __future__ import annotations

from clawdbot.devtools import service_map


def test_readme_service_map_matches_the_code() -> None:
    block = service_map.readme_block(service_map.README.read_text())
    assert block is not None, "README.md lost its service-map markers"
    assert block == service_map.render(), (
        "README's service map drifted from the code: run python -m clawdbot.devtools.service_map --write"
    )


def test_the_map_sees_the_calls_that_matter() -> None:
    edges = {(e.caller, e.callee, e.over): e.what for e in service_map.edges()}
    assert "Router.Complete" in edges["adapter", "router", "gRPC"]
    assert "ModelService.Infer" in edges["router", "worker", "gRPC"]
    assert edges["router", "health", "Kafka"] == ("clawdbot.telemetry",)
    # a service is never shown calling itself over gRPC
    assert not any(caller == callee for caller, callee, over in edges if over == "gRPC")
