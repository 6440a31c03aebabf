"""L3 in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, ...): ObjectLevel's layout, over HTTP.

    <prefix>blobs/<sha256>          the body, named by its hash: stored once, only if absent
    <prefix>index/<sha256(key)>     {"key", "stored_at", "header"} as JSON

Identical answers under different keys share one blob. An object PUT is atomic, so a
reader sees the old object or the new one, never half of one; the blob is written before
the index record that refers to it.

The bucket is an optimisation, never a dependency: when it is unreachable, slow, failing
(5xx), refusing our credentials or gone, the level marks itself down, and for
`retry_after_s` every call answers as a miss (None/False) at once, without touching the
network. After that one call at a time probes it (recreating the bucket if it vanished);
the first success marks the level up again.

boto3 is synchronous: its calls run in worker threads (a boto3 client is thread-safe);
callbacks and state changes happen on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from clawdbot.cache.entry import CorruptEntry, Entry, Header, index_record, load_index_record
from clawdbot.cache.levels import Availability, OnCorrupt, OnStateChange, report_corrupt

log = logging.getLogger(__name__)

T = TypeVar("T")

# Error codes that mean the object is not there. Matched by code, not by status 404:
# NoSuchBucket is a 404 too, and it means the level cannot work at all. HEAD responses
# have no body, so their code is the bare status.
_MISSING: Final = frozenset({"NoSuchKey", "NotFound", "404"})
# Answers that say the storage, not this one request, is unusable: worth backing off from.
_UNUSABLE_CODES: Final = frozenset(
    {"NoSuchBucket", "SlowDown", "RequestTimeout", "ExpiredToken", "TokenRefreshRequired", "InvalidAccessKeyId"}
)
_UNUSABLE_STATUSES: Final = frozenset({403, 429})
_ALREADY_OURS: Final = frozenset({"BucketAlreadyOwnedByYou"})
_S3_ERRORS: Final = (BotoCoreError, ClientError, OSError)


@dataclass(frozen=True, slots=True)
class _Found:
    entry: Entry | None = None
    corrupt: str = ""  # why the stored value was dropped, when it was


class _Unavailable:
    """What _call returns instead of a result when the storage could not answer."""


_UNAVAILABLE: Final = _Unavailable()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _missing(exc: ClientError) -> bool:
    return _code(exc) in _MISSING


def _unusable(exc: ClientError) -> bool:
    status = _status(exc)
    return status >= 500 or status in _UNUSABLE_STATUSES or _code(exc) in _UNUSABLE_CODES


class S3Level:
    name = "l3"

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None,
        region: str,
        access_key: str | None,
        secret_key: str | None,
        prefix: str = "clawdbot-cache/",
        ttl_s: float,
        op_timeout_s: float = 2.0,
        retry_after_s: float = 5.0,
        on_corrupt: OnCorrupt | None = None,
        on_state_change: OnStateChange | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`ttl_s` caps how long an entry stays (<= 0: only the entry's own expiry).

        `endpoint_url` None is AWS itself; keys None use boto3's default credential chain.
        Nothing connects here; the first call (or ensure_bucket) does.
        """
        self._bucket = bucket
        self._endpoint = endpoint_url or f"https://s3.{region}.amazonaws.com"
        self._region = region
        self._blobs = f"{prefix}blobs/"
        self._index = f"{prefix}index/"
        self._ttl_s = ttl_s
        self._on_corrupt = on_corrupt
        self._clock = clock
        config = Config(
            connect_timeout=op_timeout_s,
            read_timeout=op_timeout_s,
            # Total attempts, the first included: a retry would double what a dead endpoint
            # costs. ("max_attempts" would count retries only.)
            retries={"total_max_attempts": 1, "mode": "standard"},
            # Virtual-host addressing needs DNS per bucket; S3-compatible servers rarely have it.
            s3={"addressing_style": "path"},
            # Checksums only where S3 demands them: servers that predate the newer default
            # (CRC headers on every PUT) refuse requests that carry them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # As many as the default thread pool has workers, so no thread waits on a socket.
            max_pool_connections=32,
        )
        # A session of its own: boto3's default session is shared and not thread-safe.
        self._s3: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        self._availability = Availability(
            self.name,
            "object storage",
            retry_after_s,
            on_state_change,
            monotonic,
            endpoint=self._endpoint,
            bucket=bucket,
        )

    @property
    def up(self) -> bool:
        return self._availability.up

    def blob_key(self, digest: str) -> str:
        return self._blobs + digest

    def index_key(self, key: str) -> str:
        return self._index + hashlib.sha256(key.encode()).hexdigest()

    async def get(self, key: str) -> Entry | None:
        now = self._clock()
        found = await self._call("get", lambda: self._read(key, now))
        if isinstance(found, _Unavailable):
            return None
        if found.corrupt:
            report_corrupt(self.name, key, found.corrupt, self._on_corrupt)
        return found.entry

    async def put(self, key: str, entry: Entry) -> bool:
        now = self._clock()
        if now >= self._expiry(entry.expires_at, now):
            return False
        header = Header.of(entry)
        record = index_record(key, now, header)
        result = await self._call("put", lambda: self._write(key, header.sha256, entry.body, record))
        return result is True

    async def delete(self, key: str) -> None:
        # Only the index record: the blob may hold another key's identical answer.
        await self._call("delete", lambda: self._s3.delete_object(Bucket=self._bucket, Key=self.index_key(key)))

    async def ensure_bucket(self) -> bool:
        """Create the bucket if it is missing; False (and the level down) when that fails.

        Tries even while the level waits to retry: it is meant for startup and health checks.
        """
        result = await self._call("ensure_bucket", self._ensure_bucket, force=True, checks_bucket=True)
        return result is True

    async def close(self) -> None:
        self._s3.close()

    def _expiry(self, expires_at: float, stored_at: float) -> float:
        expires = expires_at or math.inf
        if self._ttl_s > 0:
            expires = min(expires, stored_at + self._ttl_s)
        return expires

    # --- run in worker threads ---

    def _ensure_bucket(self) -> bool:
        try:
            self._s3.head_bucket(Bucket=self._bucket)
            return True
        except ClientError as exc:
            if _status(exc) == 403:
                # Allowed to use the bucket but not to look at it (no s3:ListBucket): the
                # calls themselves will tell whether it works.
                return True
            if _status(exc) != 404:
                raise
        options: dict[str, Any] = {"Bucket": self._bucket}
        if self._region != "us-east-1":  # S3 refuses the default region as a constraint
            options["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            self._s3.create_bucket(**options)
        except ClientError as exc:
            if _code(exc) not in _ALREADY_OURS:
                raise
            return True  # another instance created it meanwhile
        log.info("created the object cache bucket", extra={"cache_level": self.name, "bucket": self._bucket})
        return True

    def _get_bytes(self, key: str) -> bytes | None:
        try:
            response = self._s3.get_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        body: bytes = response["Body"].read()
        return body

    def _delete_quietly(self, key: str) -> None:
        """Remove an object on a read path: failing to clean up must not fail the read."""
        try:
            self._s3.delete_object(Bucket=self._bucket, Key=key)
        except _S3_ERRORS as exc:
            log.debug("cannot remove a cache object", extra={"object_key": key, "error": repr(exc)})

    def _write(self, key: str, digest: str, body: bytes, record: bytes) -> bool:
        blob = self.blob_key(digest)
        try:
            head = self._s3.head_object(Bucket=self._bucket, Key=blob)
            intact = head.get("ContentLength") == len(body)
        except ClientError as exc:
            if not _missing(exc):
                raise
            intact = False
        if not intact:  # absent, or cut short by some other writer: (re)write it
            self._s3.put_object(Bucket=self._bucket, Key=blob, Body=body, ContentType="application/octet-stream")
        self._s3.put_object(Bucket=self._bucket, Key=self.index_key(key), Body=record, ContentType="application/json")
        return True

    def _read(self, key: str, now: float) -> _Found:
        index = self.index_key(key)
        raw = self._get_bytes(index)
        if raw is None:
            return _Found()
        try:
            stored_key, stored_at, header = load_index_record(raw)
            if stored_key != key:
                raise CorruptEntry("index record is for another key")
        except CorruptEntry as exc:
            self._delete_quietly(index)
            return _Found(corrupt=str(exc))
        if now >= self._expiry(header.expires_at, stored_at):
            self._delete_quietly(index)
            return _Found()
        blob = self.blob_key(header.sha256)
        body = self._get_bytes(blob)
        if body is None:
            self._delete_quietly(index)
            return _Found(corrupt="blob missing")
        try:
            return _Found(entry=header.entry(body))
        except CorruptEntry as exc:
            # The blob goes too: left in place, a put of the same answer would trust it.
            self._delete_quietly(index)
            self._delete_quietly(blob)
            return _Found(corrupt=str(exc))

    # --- up and down, on the event loop ---

    async def _call(
        self, op: str, command: Callable[[], T], *, force: bool = False, checks_bucket: bool = False
    ) -> T | _Unavailable:
        probing = self._availability.begin(force)
        if probing is None:
            return _UNAVAILABLE
        # A probe first makes sure the bucket is there: a restarted server may have lost it.
        ensure_first = probing and not checks_bucket
        try:
            result = await asyncio.to_thread(self._run, command, ensure_first)
        except ClientError as exc:
            # Only a probe that succeeds brings the level back; one refused keeps it down
            # quietly for another retry_after_s instead of a warning per call. Without its
            # bucket the level cannot work at all.
            if probing or checks_bucket or _unusable(exc):
                self._availability.down(op, exc)
                return _UNAVAILABLE
            # The storage answered, but refused this one request (too large, bad name, ...).
            log.warning(
                "object storage refused a cache request",
                extra={"cache_level": self.name, "op": op, "error": _code(exc) or repr(exc)},
            )
            return _UNAVAILABLE
        except (BotoCoreError, OSError) as exc:
            # Unreachable, timed out, connection dropped, no credentials found.
            self._availability.down(op, exc)
            return _UNAVAILABLE
        finally:
            self._availability.end(probing)
        self._availability.back()
        return result

    def _run(self, command: Callable[[], T], ensure_bucket: bool) -> T:
        if ensure_bucket:
            self._ensure_bucket()
        return command()
