"""The internal credential: what every internal gRPC call carries and every service checks.

Services trust no caller by network position (a pod, a container, a local user can all
reach their ports), so each call between services carries a shared secret, read from
CLAWDBOT_INTERNAL_TOKEN, in the `x-clawdbot-internal-token` metadata entry:

- servers: ServiceHost puts every servicer behind ServerGate (common/server_gate.py), and
  checks the same header on its HTTP side (the adapter's WebSocket endpoint) except for the open
  probes (/healthz, /metrics);
- clients: `clawdbot.common.service.internal_channel` attaches it to every call;
- Envoy adds it (overwriting any client's) to everything it sends to the adapter.

`grpc.health.v1.Health` is exempt: Kubernetes' native gRPC probes and Envoy's active
health checks cannot send metadata, and a serving status reveals nothing.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping

from clawdbot.common.config import ConfigError

TOKEN_ENV = "CLAWDBOT_INTERNAL_TOKEN"
TOKEN_METADATA_KEY = "x-clawdbot-internal-token"
REFUSAL = "missing or invalid internal credential"


def internal_token(env: Mapping[str, str] | None = None) -> str:
    """The shared internal secret; a ConfigError naming the variable when it is missing or
    cannot travel as gRPC metadata (fail closed: no credential, no service)."""
    value = (os.environ if env is None else env).get(TOKEN_ENV, "").strip()
    if not value:
        raise ConfigError(
            f"{TOKEN_ENV} is not set: internal gRPC calls need the shared internal credential "
            "(the runner generates one into .clawdbot/internal_token; elsewhere set it from a secret)"
        )
    # gRPC metadata values must be printable ASCII; a token with anything else would make
    # every call fail at the client instead of failing here, at start-up.
    if not all(0x21 <= ord(char) <= 0x7E for char in value):
        raise ConfigError(f"{TOKEN_ENV} must be printable ASCII without spaces (it travels as gRPC metadata)")
    return value


def _as_bytes(value: str | bytes) -> bytes:
    # hmac.compare_digest raises TypeError on a str with non-ASCII characters; bytes never
    # do, and surrogatepass keeps undecodable input an ordinary mismatch.
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


def credential_matches(values: Iterable[str | bytes], expected: bytes) -> bool:
    """Exactly one value, equal to the secret (compared in constant time). Two values are
    refused even if one is right: a proxy might have checked the other one."""
    found: list[str | bytes] = list(values)
    return len(found) == 1 and hmac.compare_digest(_as_bytes(found[0]), expected)


def metadata_values(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[str | bytes]:
    return [value for key, value in metadata or () if key == TOKEN_METADATA_KEY]
