"""`python -m clawdbot.adapter`: the protocol adapter service."""

from clawdbot.adapter.server import create_server
from clawdbot.common.entrypoint import main

if __name__ == "__main__":
    raise SystemExit(main("adapter", create_server))
