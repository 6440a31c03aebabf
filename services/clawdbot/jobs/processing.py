"""What happens to a job once a consumer has it, whichever queue brought it: run it,
store its end state exactly once, tell its callback."""

from __future__ import annotations

import logging
import os

import aiohttp

from clawdbot.common.config import JobsConfig
from clawdbot.jobs.callbacks import deliver
from clawdbot.jobs.execution import JobExecutor
from clawdbot.jobs.records import Job
from clawdbot.jobs.store import JobStore

log = logging.getLogger(__name__)


class JobProcessor:
    def __init__(self, executor: JobExecutor, store: JobStore, config: JobsConfig) -> None:
        self.executor = executor
        self.store = store
        self._secret = os.environ.get(config.callback_secret_env, "").encode()
        self._session: aiohttp.ClientSession | None = None

    async def process(self, job: Job) -> tuple[Job, bool]:
        """The job in its end state, and whether this call stored it (False: another
        delivery of the same job had finished it first)."""
        done = await self.executor.run(job)
        stored = await self.store.finish(done)
        log.info(
            "job finished", extra={"job": job.id, "status": done.status, "attempts": done.attempts, "stored": stored}
        )
        if stored and done.callback_url:
            if not self._secret:
                log.warning("job callback sent unsigned: no secret configured", extra={"job": job.id})
            if self._session is None:
                self._session = aiohttp.ClientSession()
            await deliver(self._session, done, self._secret)
        return done, stored

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
