"""`python -m clawdbot.cache`: the three-level cache behind gRPC."""

from clawdbot.cache.server import create_server
from clawdbot.common.entrypoint import main

if __name__ == "__main__":
    raise SystemExit(main("cache", create_server))
