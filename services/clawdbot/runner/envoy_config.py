"""Render Envoy's bootstrap from envoy/envoy.yaml.tmpl.

`python -m clawdbot.runner.envoy_config` writes the default rendering to envoy/envoy.yaml,
the checked-in example; the runner renders its own copy with the ports it actually uses.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from clawdbot.common.config import Config

REPO_ROOT = Path(__file__).resolve().parents[3]
TEMPLATE_PATH = REPO_ROOT / "envoy" / "envoy.yaml.tmpl"
DEFAULT_OUTPUT = REPO_ROOT / "envoy" / "envoy.yaml"
DEFAULT_DESCRIPTOR = REPO_ROOT / "envoy" / "clawdbot.pb"

# Envoy's own replies say little (%LOCAL_REPLY_BODY%, e.g. "no healthy upstream", may be
# empty); %RESPONSE_CODE_DETAILS% names the exact cause (e.g. "no_healthy_upstream").
_DETAIL = "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)"
# For statuses not listed in local_reply_errors().
_FALLBACK_ERROR = ("api_error", "%RESPONSE_CODE_DETAILS%", f"Gateway error: {_DETAIL}")
# How Envoy marks a request it refused for load: response flag UO, a circuit breaker on
# the adapter cluster overflowed; OM, the overload manager reset a stream; and code
# details "overload", the overload manager's stop_accepting_requests (which sets no flag,
# checked with Envoy 1.40). Their 503 is `overloaded`, with Retry-After, like the
# services' own.
OVERLOAD_FLAGS = ("UO", "OM")
OVERLOAD_DETAILS = "overload"
OVERLOAD_ERROR = ("service_unavailable", "overloaded", f"The gateway is overloaded, retry later: {_DETAIL}")
# New streams Envoy starts per connection per event-loop pass (HTTP/2 rapid-reset and
# pipelining floods): the rest wait a pass, so one connection cannot starve the others.
MAX_REQUESTS_PER_IO_CYCLE = 10


def local_reply_errors(max_request_bytes: int) -> dict[int, tuple[str, str, str]]:
    """Per HTTP status of an Envoy-made reply: (OpenAI error type, code, message format)."""
    return {
        400: ("invalid_request_error", "bad_request", f"Bad request: {_DETAIL}"),
        401: ("authentication_error", "unauthorized", f"Unauthorized: {_DETAIL}"),
        403: ("permission_error", "forbidden", f"Forbidden: {_DETAIL}"),
        # OpenAI's own wording for an unknown route.
        404: (
            "invalid_request_error",
            "not_found",
            "Invalid URL (%REQ(X-ENVOY-ORIGINAL-METHOD?:METHOD)% %REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%)",
        ),
        405: ("invalid_request_error", "method_not_allowed", f"Method not allowed: {_DETAIL}"),
        408: ("timeout", "request_timeout", f"Request not received in time: {_DETAIL}"),
        413: (
            "invalid_request_error",
            "request_too_large",
            f"Request body larger than {max_request_bytes} bytes: {_DETAIL}",
        ),
        429: ("rate_limit_error", "rate_limit_exceeded", f"Too many requests: {_DETAIL}"),
        431: ("invalid_request_error", "headers_too_large", f"Request headers too large: {_DETAIL}"),
        500: ("server_error", "internal_error", f"Internal error: {_DETAIL}"),
        502: ("server_error", "bad_gateway", f"Bad gateway: {_DETAIL}"),
        503: ("service_unavailable", "service_unavailable", f"Service unavailable: {_DETAIL}"),
        504: ("timeout", "timeout", f"Upstream timed out: {_DETAIL}"),
    }


@dataclass(frozen=True)
class EnvoyParams:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_port: int = 9901  # admin is always bound to 127.0.0.1 only
    adapter_host: str = "127.0.0.1"
    adapter_grpc_port: int = 7001  # Gateway + reflection + grpc.health.v1
    adapter_http_port: int = 7002  # aiohttp: /v1/ws, /healthz, /metrics
    descriptor_path: str = str(DEFAULT_DESCRIPTOR)
    max_request_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 300  # whole-request ceiling for unary/streamed calls
    # An open WebSocket is closed after this long without a frame either way.
    ws_idle_timeout_s: float = 3600
    enable_rest: bool = True  # False: no transcoder; REST paths get an OpenAI-shaped 404
    enable_ws: bool = True  # False: no /v1/ws route
    # Overload manager and circuit breakers (see GatewayConfig for what each bounds).
    max_heap_size_bytes: int = 1024 * 1024 * 1024
    max_connections: int = 50_000
    max_upstream_requests: int = 10_000
    max_pending_requests: int = 1_000
    overload_retry_after_s: int = 1
    # TLS on the public listener when both are set (absolute paths of PEM files).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # A second listener on listen_host serving only GET /stats/prometheus and /ready from
    # the admin API, for Prometheus and Kubernetes probes; 0: none (the local runner's
    # Prometheus reads the admin port on loopback). Left out of the rendered header, which
    # the listener itself documents.
    stats_port: int = field(default=0, repr=False)
    # More adapter processes on adapter_host beside the one at adapter_grpc_port and
    # adapter_http_port: one (grpc_port, http_port) each (the runner's adapter.replicas).
    # Both adapter clusters balance over all of them. Left out of the rendered header:
    # the endpoints are listed in the clusters themselves.
    adapter_replica_ports: tuple[tuple[int, int], ...] = field(default=(), repr=False)

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> EnvoyParams:
        """Envoy in front of the adapter the configuration describes (overrides: where the
        descriptor set is, a stats listener, ...)."""
        return cls(
            listen_host=config.gateway.host,
            listen_port=config.gateway.port,
            admin_port=config.gateway.admin_port,
            adapter_host=config.adapter.host,
            adapter_grpc_port=config.adapter.grpc_port,
            adapter_http_port=config.adapter.http_port,
            max_request_bytes=config.gateway.max_request_bytes,
            request_timeout_s=config.gateway.request_timeout_s,
            enable_rest="rest" in config.adapter.types,
            enable_ws="ws" in config.adapter.types,
            max_heap_size_bytes=config.gateway.max_heap_size_bytes,
            max_connections=config.gateway.max_connections,
            max_upstream_requests=config.gateway.max_upstream_requests,
            max_pending_requests=config.gateway.max_pending_requests,
            overload_retry_after_s=config.gateway.overload_retry_after_s,
            tls_cert_file=config.gateway.tls.cert_file,
            tls_key_file=config.gateway.tls.key_file,
            **overrides,
        )

    @property
    def adapter_ports(self) -> list[tuple[int, int]]:
        """(grpc_port, http_port) of every adapter process, the first one's first."""
        return [(self.adapter_grpc_port, self.adapter_http_port), *self.adapter_replica_ports]

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def scheme(self) -> str:
        """How clients reach the public listener: https with TLS, else http."""
        return "https" if self.tls else "http"

    def __post_init__(self) -> None:
        for name in ("listen_port", "admin_port", "adapter_grpc_port", "adapter_http_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {port}")
        for grpc_port, http_port in self.adapter_replica_ports:
            if not (0 < grpc_port < 65536 and 0 < http_port < 65536):
                raise ValueError(f"adapter replica ports must be in 1..65535, got {grpc_port}, {http_port}")
        ports = [(self.adapter_grpc_port, self.adapter_http_port), *self.adapter_replica_ports]
        every = [port for pair in ports for port in pair]
        if len(set(every)) != len(every):
            raise ValueError(f"every adapter replica needs ports of its own, got {ports}")
        if not 0 <= self.stats_port < 65536 or self.stats_port in (self.listen_port, self.admin_port):
            raise ValueError(f"stats_port must be 0 (none) or a port of its own, got {self.stats_port}")
        # The buffer filter and the transcoder take a uint32 that must be > 0.
        if not 0 < self.max_request_bytes < 2**32:
            raise ValueError(f"max_request_bytes must be in 1..2**32-1, got {self.max_request_bytes}")
        # Envoy reads durations in milliseconds at best; 0 would mean "no timeout".
        for name in ("request_timeout_s", "ws_idle_timeout_s"):
            if getattr(self, name) < 0.001:
                raise ValueError(f"{name} must be at least 1 ms")
        for name in ("max_heap_size_bytes", "max_connections", "max_upstream_requests", "max_pending_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.overload_retry_after_s < 1:
            raise ValueError(f"overload_retry_after_s must be at least 1, got {self.overload_retry_after_s}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        # Envoy resolves relative paths against its working directory, not this repo.
        for name in ("descriptor_path", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if (path or name == "descriptor_path") and not Path(path).is_absolute():
                raise ValueError(f"{name} must be absolute, got {path}")


def _duration(seconds: float) -> str:
    millis = round(seconds * 1000)
    whole, frac = divmod(millis, 1000)
    return f"{whole}.{frac:03d}s" if frac else f"{whole}s"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _yaml_str(value: str) -> str:
    # A JSON string is a valid double-quoted YAML scalar, escapes included.
    return json.dumps(value)


def _indented(lines: list[str], indent: int) -> str:
    return "\n".join(" " * indent + line for line in lines)


def _lb_endpoints(host: str, ports: list[int], indent: int) -> str:
    """The lb_endpoints items of an adapter cluster: one per adapter process."""
    lines: list[str] = []
    for port in ports:
        lines += [
            "- endpoint:",
            "    address:",
            f"      socket_address: {{ address: {_yaml_str(host)}, port_value: {port} }}",
        ]
    return _indented(lines, indent)


def _openai_error_format(error_type: str, code: str, message: str) -> list[str]:
    lines = [
        "content_type: application/json",
        "json_format:",
        "  error:",
        f"    message: {_yaml_str(message)}",
        f"    type: {_yaml_str(error_type)}",
        "    param: null",
        f"    code: {_yaml_str(code)}",
    ]
    if "%REQ_WITHOUT_QUERY(" in message:
        lines += [
            "formatters:",
            "  - name: envoy.formatter.req_without_query",
            "    typed_config:",
            '      "@type": type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery',
        ]
    return lines


def _status_is(status: int) -> list[str]:
    return [
        "status_code_filter:",
        "  comparison:",
        "    op: EQ",
        f"    value: {{ default_value: {status}, runtime_key: clawdbot.local_reply.{status} }}",
    ]


def _mapper(filter_lines: list[str], body_format: list[str], headers_to_add: dict[str, str] | None = None) -> list[str]:
    lines = [
        "- filter:",
        *("    " + line for line in filter_lines),
        "  body_format_override:",
        *("    " + line for line in body_format),
    ]
    if headers_to_add:
        lines.append("  headers_to_add:")
        for key, value in headers_to_add.items():
            lines += [
                "    - header:",
                f"        key: {_yaml_str(key)}",
                f"        value: {_yaml_str(value)}",
                "      append_action: OVERWRITE_IF_EXISTS_OR_ADD",
            ]
    return lines


def _and(*filters: list[str]) -> list[str]:
    lines = ["and_filter:", "  filters:"]
    for filter_lines in filters:
        lines += ["    - " + filter_lines[0], *("      " + line for line in filter_lines[1:])]
    return lines


def _local_reply_mappers(params: EnvoyParams, indent: int) -> str:
    # Mappers are tried in order: the specific ones before the one per status.
    # A 503 for load (not, say, an adapter that is down) says so and when to come back.
    for_load = [
        "or_filter:",
        "  filters:",
        f"    - response_flag_filter: {{ flags: [{', '.join(OVERLOAD_FLAGS)}] }}",
        "    - extension_filter:",
        "        name: envoy.access_loggers.extension_filters.cel",
        "        typed_config:",
        '          "@type": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter',
        f"          expression: {_yaml_str(f'response.code_details == {_yaml_str(OVERLOAD_DETAILS)}')}",
    ]
    overload_filter = _and(_status_is(503), for_load)
    lines = _mapper(
        overload_filter,
        _openai_error_format(*OVERLOAD_ERROR),
        {"retry-after": str(params.overload_retry_after_s)},
    )
    # Envoy refuses an upgrade anywhere but /v1/ws with a bare 403 "upgrade_failed"; say
    # what is actually wrong.
    upgrade_filter = _and(_status_is(403), ["header_filter:", "  header: { name: upgrade, present_match: true }"])
    where = "only served on /v1/ws" if params.enable_ws else "disabled on this gateway"
    lines += _mapper(
        upgrade_filter,
        _openai_error_format(
            "invalid_request_error",
            "upgrade_not_supported",
            f"WebSocket upgrades are {where} (%RESPONSE_CODE_DETAILS%)",
        ),
    )
    for status, (error_type, code, message) in sorted(local_reply_errors(params.max_request_bytes).items()):
        lines += _mapper(_status_is(status), _openai_error_format(error_type, code, message))
    return _indented(lines, indent)


def _select_features(text: str, enabled: dict[str, bool]) -> str:
    """Keep or drop the lines between `#if feature` and `#endif` (column 0; may nest)."""
    kept: list[str] = []
    stack: list[bool] = []
    for lineno, line in enumerate(text.splitlines(keepends=True), start=1):
        if line.startswith("#if "):
            feature = line[4:].strip()
            if feature not in enabled:
                raise ValueError(f"{TEMPLATE_PATH}:{lineno}: unknown feature {feature!r}")
            stack.append(enabled[feature])
        elif line.rstrip() == "#endif":
            if not stack:
                raise ValueError(f"{TEMPLATE_PATH}:{lineno}: #endif without #if")
            stack.pop()
        elif all(stack):
            kept.append(line)
    if stack:
        raise ValueError(f"{TEMPLATE_PATH}: unterminated #if")
    return "".join(kept)


def render(params: EnvoyParams) -> str:
    """The bootstrap YAML for params."""
    template = TEMPLATE_PATH.read_text()
    features = {"rest": params.enable_rest, "ws": params.enable_ws, "stats": params.stats_port > 0, "tls": params.tls}
    selected = _select_features(template, features)
    header = f"# Generated from envoy/envoy.yaml.tmpl by clawdbot.runner.envoy_config: edit those.\n# {params}\n\n"
    return header + Template(selected).substitute(
        listen_host=_yaml_str(params.listen_host),
        listen_port=params.listen_port,
        admin_port=params.admin_port,
        stats_port=params.stats_port,
        adapter_host=_yaml_str(params.adapter_host),
        adapter_grpc_port=params.adapter_grpc_port,
        adapter_http_port=params.adapter_http_port,
        adapter_grpc_endpoints=_lb_endpoints(params.adapter_host, [g for g, _ in params.adapter_ports], indent=14),
        adapter_http_endpoints=_lb_endpoints(params.adapter_host, [h for _, h in params.adapter_ports], indent=14),
        # IP literals need no resolver; a name (e.g. a compose service) is re-resolved.
        adapter_cluster_type="STATIC" if _is_ip(params.adapter_host) else "STRICT_DNS",
        descriptor_path=_yaml_str(params.descriptor_path),
        max_request_bytes=params.max_request_bytes,
        max_heap_size_bytes=params.max_heap_size_bytes,
        max_connections=params.max_connections,
        max_upstream_requests=params.max_upstream_requests,
        max_pending_requests=params.max_pending_requests,
        max_requests_per_io_cycle=MAX_REQUESTS_PER_IO_CYCLE,
        tls_cert_file=_yaml_str(params.tls_cert_file),
        tls_key_file=_yaml_str(params.tls_key_file),
        request_timeout=_duration(params.request_timeout_s),
        ws_idle_timeout=_duration(params.ws_idle_timeout_s),
        local_reply_mappers=_local_reply_mappers(params, indent=20),
        local_reply_default=_indented(_openai_error_format(*_FALLBACK_ERROR), indent=20),
    )


def write(params: EnvoyParams, path: Path) -> Path:
    """Render params into path (parents created); return path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside then renamed, so an Envoy (re)starting meanwhile never reads half a file.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(render(params))
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT, help="where to write")
    args = parser.parse_args(argv)
    print(f"wrote {write(EnvoyParams(), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
