"""Kafka topics of async jobs and telemetry, and the consumer group that runs jobs."""

from typing import Final

JOBS: Final = "clawdbot.jobs"
RESULTS: Final = "clawdbot.results"
DLQ: Final = "clawdbot.jobs.dlq"
TELEMETRY: Final = "clawdbot.telemetry"
CONSUMER_GROUP: Final = "clawdbot-jobs"
