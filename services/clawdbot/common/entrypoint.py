"""The shared `python -m clawdbot.<service>` entry point: config, logging, tracing, serve."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from clawdbot.common.config import Config, ConfigError, load_config
from clawdbot.common.logging import setup_logging
from clawdbot.common.service import ServiceHost, run_service, run_until_signalled
from clawdbot.common.telemetry import setup_tracing


def main(service: str, create_server: Callable[[Config], ServiceHost], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m clawdbot.{service}")
    parser.add_argument("--config", type=Path, help="YAML file (default: CLAWDBOT_CONFIG or config/clawdbot.yaml)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"clawdbot-{service}: {exc}", file=sys.stderr)
        return 2
    setup_logging(service, config.logging.level)
    provider = setup_tracing(service, config.telemetry)
    log = logging.getLogger(f"clawdbot.{service}")

    async def _serve() -> None:
        host = create_server(config)
        await run_until_signalled(host)

    try:
        run_service(_serve)
    except ConfigError as exc:
        log.error("invalid configuration", extra={"error": str(exc)})
        return 2
    except OSError as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return 1
    finally:
        # Last step of the shutdown order in common/service.py: flush spans.
        provider.shutdown()
    return 0
