"""Callbacks: the finished job POSTed to the URL its owner gave, signed so the receiver can
check it came from this gateway: `x-clawdbot-signature: sha256=<hex HMAC-SHA256(secret, body)>`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

import aiohttp
import orjson

from clawdbot.jobs.records import Job

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-clawdbot-signature"
ATTEMPTS = 3


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


async def deliver(session: aiohttp.ClientSession, job: Job, secret: bytes) -> bool:
    """POST the job; a few tries with backoff. False when the receiver never took it."""
    body = orjson.dumps(job.public())
    headers = {"content-type": "application/json", SIGNATURE_HEADER: sign(secret, body), "x-clawdbot-job-id": job.id}
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with session.post(
                job.callback_url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                if resp.status < 300:
                    return True
                reason = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = type(exc).__name__
        log.warning("job callback failed", extra={"job": job.id, "attempt": attempt, "error": reason})
        await asyncio.sleep(0.5 * attempt)
    return False
