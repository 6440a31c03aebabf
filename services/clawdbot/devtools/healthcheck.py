"""A container's health check, with what the images have (no curl, no grpc_health_probe):

    python -m clawdbot.devtools.healthcheck grpc PORT     grpc.health.v1 Check, service ""
    python -m clawdbot.devtools.healthcheck http PORT [PATH]     HTTP 200 (default /healthz)

Exit 0 when healthy, 1 when not (with the reason on stderr): what Docker's HEALTHCHECK
and compose's `healthcheck.test` expect. Neither check needs the internal credential:
grpc.health.v1 and /healthz are the probes services leave open. The host is 127.0.0.1 unless --host says
otherwise: a check runs inside the container it checks.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def grpc_serving(host: str, port: int, service: str, timeout_s: float) -> str | None:
    """None when SERVING, else why not."""
    # Imported here: the HTTP check stays quick to start without grpc.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return f"grpc {host}:{port}: {exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"grpc {host}:{port}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def http_ok(host: str, port: int, path: str, timeout_s: float) -> str | None:
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"
    return None if status == 200 else f"{url}: HTTP {status}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clawdbot.devtools.healthcheck", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    kinds = parser.add_subparsers(dest="kind", required=True)
    grpc_parser = kinds.add_parser("grpc", help="grpc.health.v1 Check")
    grpc_parser.add_argument("port", type=int)
    grpc_parser.add_argument("--service", default="", help='the service name to ask about (default "": the server)')
    http_parser = kinds.add_parser("http", help="GET, expecting 200")
    http_parser.add_argument("port", type=int)
    http_parser.add_argument("path", nargs="?", default="/healthz")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kind == "grpc":
        problem = grpc_serving(args.host, args.port, args.service, args.timeout)
    else:
        problem = http_ok(args.host, args.port, args.path, args.timeout)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
