"""The shared `python -m clawdbot.<service>` entry point: config, logging, tracing, serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clawdbot.common.config import Config, ConfigError, load_config
from clawdbot.common.lifeline import Lifeline
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
        # The default executor (asyncio.to_thread) is one we can shut down without waiting:
        # asyncio.run would wait for a thread stuck in a computation for as long as it runs.
        executor = ThreadPoolExecutor(thread_name_prefix=f"{service}-to-thread")
        asyncio.get_running_loop().set_default_executor(executor)
        host = create_server(config)
        lifeline = Lifeline.from_environment(service, host.endpoint.shutdown_grace_s)
        lifeline.watch_parent()
        await run_until_signalled(host, on_signal=lifeline.arm)
        executor.shutdown(wait=False, cancel_futures=True)
        # Threads still computing now have nobody to answer: leave without them.
        lifeline.finish(flush=provider.shutdown)

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
