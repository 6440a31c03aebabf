"""`python -m clawdbot.worker`: local model runtimes behind gRPC."""

from clawdbot.common.entrypoint import main
from clawdbot.worker.server import create_server

if __name__ == "__main__":
    raise SystemExit(main("worker", create_server))
