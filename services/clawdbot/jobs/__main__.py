"""`python -m clawdbot.jobs`: a consumer of async jobs."""

from clawdbot.common.entrypoint import main
from clawdbot.jobs.server import create_server

if __name__ == "__main__":
    raise SystemExit(main("jobs", create_server))
