"""`python -m clawdbot.health`: watches every model instance and takes bad ones out of rotation."""

from clawdbot.common.entrypoint import main
from clawdbot.health.server import create_server

if __name__ == "__main__":
    raise SystemExit(main("health", create_server))
