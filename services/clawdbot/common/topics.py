"""Kafka topics of async jobs and telemetry, their partition counts, and the consumer
group that runs jobs."""

from typing import Final

JOBS: Final = "clawdbot.jobs"
RESULTS: Final = "clawdbot.results"
DLQ: Final = "clawdbot.jobs.dlq"
TELEMETRY: Final = "clawdbot.telemetry"
CONSUMER_GROUP: Final = "clawdbot-jobs"
# Partitions of the telemetry topic: the router publishes to it, the health service
# reads it, and whichever starts first creates it.
TELEMETRY_PARTITIONS: Final = 6
