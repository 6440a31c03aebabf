"""What happens to a job once a consumer has it, whichever queue brought it: run it,
store its end state exactly once, hand its callback to the delivery queue (never waited
on here: a receiver that hangs must not hold up this job's consumer, nor anyone else's)."""

from __future__ import annotations

import logging

from clawdbot.common.config import JobsConfig
from clawdbot.jobs.callbacks import CallbackDelivery
from clawdbot.jobs.execution import JobExecutor
from clawdbot.jobs.records import Job
from clawdbot.jobs.store import JobStore

log = logging.getLogger(__name__)


class JobProcessor:
    def __init__(
        self,
        executor: JobExecutor,
        store: JobStore,
        config: JobsConfig,
        callbacks: CallbackDelivery | None = None,
    ) -> None:
        """Raises ConfigError when callbacks cannot be signed (no secret): at start, not at
        the first job."""
        self.executor = executor
        self.store = store
        self.callbacks = callbacks or CallbackDelivery.from_config(config)

    async def process(self, job: Job) -> tuple[Job, bool]:
        """The job in its end state, and whether this call stored it (False: another
        delivery of the same job had finished it first)."""
        done = await self.executor.run(job)
        stored = await self.store.finish(done)
        log.info(
            "job finished", extra={"job": job.id, "status": done.status, "attempts": done.attempts, "stored": stored}
        )
        if stored and done.callback_url:
            self.callbacks.submit(done)
        return done, stored

    async def close(self) -> None:
        await self.callbacks.close()
