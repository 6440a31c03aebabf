"""`python -m clawdbot.orchestrator`: workflows of models, retrieval and transforms."""

from clawdbot.common.entrypoint import main
from clawdbot.orchestrator.server import create_server

if __name__ == "__main__":
    raise SystemExit(main("orchestrator", create_server))
