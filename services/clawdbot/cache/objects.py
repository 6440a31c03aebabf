"""L3: answers as files in a directory, the level for values too big for memory.

    root/blobs/<sha256[:2]>/<sha256>          the body, named by its hash: stored once
    root/index/<sha256(key)[:2]>/<sha256(key)> {"key", "stored_at", "header"} as JSON

Identical answers under different keys share one blob. Every file is written to a
temporary name in its directory, fsynced and renamed over, so a reader sees the old file
or the new one, never half of one. File IO runs in worker threads; callbacks and state
changes happen on the event loop.

A write that fails (directory gone, unwritable, disk full) marks the level down: for
`retry_after_s` writes are refused without touching the disk, then the next one tries,
and the first that succeeds marks it up. Reads always try: what was written stays readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from clawdbot.cache.entry import CorruptEntry, Entry, Header, index_record, is_sha256_hex, load_index_record
from clawdbot.cache.levels import Availability, OnCorrupt, OnStateChange, report_corrupt

log = logging.getLogger(__name__)

_TEMP_PREFIX: Final = ".tmp-"


@dataclass(frozen=True, slots=True)
class _Found:
    entry: Entry | None = None
    corrupt: str = ""  # why the stored value was dropped, when it was


def _write_atomically(path: Path, data: bytes, fsync: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        # The rename is durable only once the directory is.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _unlink(path: Path) -> None:
    """Remove a file on a read path: failing to clean up must not fail the read."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("cannot remove a cache file", extra={"path": str(path), "error": repr(exc)})


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime <= cutoff
    except FileNotFoundError:
        return False


def _files(directory: Path) -> Iterator[Path]:
    """The files of a two-level fan-out directory; nothing when it does not exist."""
    with contextlib.suppress(FileNotFoundError):
        for fan in directory.iterdir():
            if fan.is_dir():
                yield from (p for p in fan.iterdir() if p.is_file())


class ObjectLevel:
    name = "l3"

    def __init__(
        self,
        root: Path,
        ttl_s: float,
        *,
        on_corrupt: OnCorrupt | None = None,
        on_state_change: OnStateChange | None = None,
        retry_after_s: float = 5.0,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`ttl_s` caps how long an entry stays (<= 0: only the entry's own expiry)."""
        self.root = root
        self._blobs = root / "blobs"
        self._index = root / "index"
        self._ttl_s = ttl_s
        self._on_corrupt = on_corrupt
        self._fsync = fsync
        self._clock = clock
        self._availability = Availability(
            self.name, "object cache directory", retry_after_s, on_state_change, monotonic, root=str(root)
        )

    @property
    def up(self) -> bool:
        return self._availability.up

    def blob_path(self, digest: str) -> Path:
        # Headers are checked when decoded; this is the last line before the file system.
        if not is_sha256_hex(digest):
            raise CorruptEntry("sha256 is not a hex digest")
        return self._blobs / digest[:2] / digest

    def index_path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self._index / digest[:2] / digest

    async def get(self, key: str) -> Entry | None:
        try:
            found = await asyncio.to_thread(self._read, key, self._clock())
        except OSError as exc:
            log.warning(
                "cannot read the object cache", extra={"cache_level": self.name, "key": key, "error": repr(exc)}
            )
            return None
        if found.corrupt:
            report_corrupt(self.name, key, found.corrupt, self._on_corrupt)
        return found.entry

    async def put(self, key: str, entry: Entry) -> bool:
        now = self._clock()
        if now >= self._expiry(entry.expires_at, now):
            return False
        # Reads are never gated (a directory may be readable but not writable); writes are.
        probing = self._availability.begin()
        if probing is None:
            return False
        header = Header.of(entry)
        record = index_record(key, now, header)
        try:
            await asyncio.to_thread(self._write, key, header.sha256, entry.body, record)
        except OSError as exc:
            self._availability.down("put", exc)
            return False
        finally:
            self._availability.end(probing)
        self._availability.back()
        return True

    async def delete(self, key: str) -> None:
        # Only the index record: the blob may hold another key's identical answer; sweep()
        # removes blobs nothing refers to.
        try:
            await asyncio.to_thread(self.index_path(key).unlink, missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete from the object cache", extra={"cache_level": self.name, "error": repr(exc)})

    async def sweep(self, max_age_s: float) -> int:
        """Remove expired or broken index records, then blobs that no record refers to and
        that are older than `max_age_s` (the margin keeps a blob a put is about to refer to).
        Returns the number of blobs removed."""
        return await asyncio.to_thread(self._sweep, max_age_s, self._clock())

    def _expiry(self, expires_at: float, stored_at: float) -> float:
        expires = expires_at or math.inf
        if self._ttl_s > 0:
            expires = min(expires, stored_at + self._ttl_s)
        return expires

    def _write(self, key: str, digest: str, body: bytes, record: bytes) -> None:
        blob = self.blob_path(digest)
        try:
            intact = blob.stat().st_size == len(body)
        except FileNotFoundError:
            intact = False
        if intact:
            os.utime(blob)  # referred to again: keep it young for sweep()
        else:
            _write_atomically(blob, body, self._fsync)
        _write_atomically(self.index_path(key), record, self._fsync)

    def _read(self, key: str, now: float) -> _Found:
        index = self.index_path(key)
        try:
            raw = index.read_bytes()
        except FileNotFoundError:
            return _Found()
        try:
            stored_key, stored_at, header = load_index_record(raw)
            if stored_key != key:
                raise CorruptEntry("index record is for another key")
        except CorruptEntry as exc:
            _unlink(index)
            return _Found(corrupt=str(exc))
        if now >= self._expiry(header.expires_at, stored_at):
            _unlink(index)
            return _Found()
        blob = self.blob_path(header.sha256)
        try:
            body = blob.read_bytes()
        except FileNotFoundError:
            _unlink(index)
            return _Found(corrupt="blob missing")
        try:
            return _Found(entry=header.entry(body))
        except CorruptEntry as exc:
            # The blob goes too: left in place, a put of the same answer would trust it.
            _unlink(index)
            _unlink(blob)
            return _Found(corrupt=str(exc))

    def _sweep(self, max_age_s: float, now: float) -> int:
        cutoff = time.time() - max_age_s  # file times are wall-clock times
        referenced: set[str] = set()
        for path in _files(self._index):
            if path.name.startswith(_TEMP_PREFIX):
                if _older_than(path, cutoff):
                    _unlink(path)  # left by a writer that died
                continue
            try:
                _key, stored_at, header = load_index_record(path.read_bytes())
            except CorruptEntry:
                _unlink(path)
                continue
            except FileNotFoundError:
                continue  # deleted meanwhile
            if now >= self._expiry(header.expires_at, stored_at):
                _unlink(path)
            else:
                referenced.add(header.sha256)
        removed = 0
        for path in _files(self._blobs):
            if path.name in referenced or not _older_than(path, cutoff):
                continue
            _unlink(path)
            removed += not path.name.startswith(_TEMP_PREFIX)
        if removed:
            log.info("swept unreferenced cache blobs", extra={"cache_level": self.name, "removed": removed})
        return removed
