"""`python -m clawdbot.router`: the model router service."""

from clawdbot.common.entrypoint import main
from clawdbot.router.server import create_server

if __name__ == "__main__":
    raise SystemExit(main("router", create_server))
