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
    # A second listener on listen_host serving only GET /stats/prometheus and /ready from
    # the admin API, for Prometheus and Kubernetes probes; 0: none (the local runner's
    # Prometheus reads the admin port on loopback). Left out of the rendered header, which
    # the listener itself documents.
    stats_port: int = field(default=0, repr=False)

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
            **overrides,
        )

    def __post_init__(self) -> None:
        for name in ("listen_port", "admin_port", "adapter_grpc_port", "adapter_http_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ValueError(f"{name} must be in 1..65535, got {port}")
        if not 0 <= self.stats_port < 65536 or self.stats_port in (self.listen_port, self.admin_port):
            raise ValueError(f"stats_port must be 0 (none) or a port of its own, got {self.stats_port}")
        # The buffer filter and the transcoder take a uint32 that must be > 0.
        if not 0 < self.max_request_bytes < 2**32:
            raise ValueError(f"max_request_bytes must be in 1..2**32-1, got {self.max_request_bytes}")
        # Envoy reads durations in milliseconds at best; 0 would mean "no timeout".
        for name in ("request_timeout_s", "ws_idle_timeout_s"):
            if getattr(self, name) < 0.001:
                raise ValueError(f"{name} must be at least 1 ms")
        if not Path(self.descriptor_path).is_absolute():
            # Envoy resolves relative paths against its working directory, not this repo.
            raise ValueError(f"descriptor_path must be absolute, got {self.descriptor_path}")


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


def _mapper(filter_lines: list[str], body_format: list[str]) -> list[str]:
    return [
        "- filter:",
        *("    " + line for line in filter_lines),
        "  body_format_override:",
        *("    " + line for line in body_format),
    ]


def _local_reply_mappers(params: EnvoyParams, indent: int) -> str:
    # Envoy refuses an upgrade anywhere but /v1/ws with a bare 403 "upgrade_failed"; say
    # what is actually wrong. Mappers are tried in order, so this one goes first.
    status_403 = _status_is(403)
    upgrade_filter = [
        "and_filter:",
        "  filters:",
        "    - " + status_403[0],
        *("      " + line for line in status_403[1:]),
        "    - header_filter:",
        "        header: { name: upgrade, present_match: true }",
    ]
    where = "only served on /v1/ws" if params.enable_ws else "disabled on this gateway"
    lines = _mapper(
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
    features = {"rest": params.enable_rest, "ws": params.enable_ws, "stats": params.stats_port > 0}
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
        # IP literals need no resolver; a name (e.g. a compose service) is re-resolved.
        adapter_cluster_type="STATIC" if _is_ip(params.adapter_host) else "STRICT_DNS",
        descriptor_path=_yaml_str(params.descriptor_path),
        max_request_bytes=params.max_request_bytes,
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
