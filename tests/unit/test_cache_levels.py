"""The cache's entry codec, L1 memory and L3 object levels (L2 has its own test on a real Redis)."""

from __future__ import annotations

import hashlib
import shutil
import struct
from collections import Counter
from pathlib import Path

import orjson
import pytest

from clawdbot.cache.entry import MAGIC, CorruptEntry, Entry, Header, decode, encode
from clawdbot.cache.levels import Level
from clawdbot.cache.memory import ENTRY_OVERHEAD_BYTES, MemoryLevel, entry_cost
from clawdbot.cache.objects import ObjectLevel
from clawdbot.cache.redis_level import RedisLevel

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def entry(body: bytes = b'{"answer": 42}', expires_at: float = 0.0, **attributes: str) -> Entry:
    return Entry(body, "application/json", T0, expires_at, attributes or {"instance": "mock-1", "strategy": "cost"})


# --- entry codec ---


@pytest.mark.parametrize(
    "value",
    [
        entry(),
        entry(b""),
        entry(bytes(range(256)) * 100, expires_at=T0 + 60),
        Entry(b"\x00ok", "audio/mpeg", 1.5, 0, {}),
        Entry("héllo ☃".encode(), "text/plain; charset=utf-8", T0, T0 + 1, {"ключ": "值"}),
    ],
)
def test_entry_round_trip(value: Entry) -> None:
    data = encode(value)
    assert data.startswith(MAGIC)
    assert decode(data) == value
    assert decode(bytearray(data)) == value


def test_entry_expiry_and_age() -> None:
    forever = entry()
    assert not forever.expired(T0 + 10**9)
    assert forever.age(T0 + 5) == 5
    assert forever.age(T0 - 5) == 0  # clocks disagree: never negative
    short = entry(expires_at=T0 + 10)
    assert not short.expired(T0 + 9.999)
    assert short.expired(T0 + 10)
    assert short.remaining(T0 + 4) == 6


def test_entry_keeps_its_own_attributes() -> None:
    attributes = {"instance": "a"}
    value = Entry(b"x", "text/plain", T0, 0, attributes)
    attributes["instance"] = "b"
    assert value.attributes == {"instance": "a"}


def _frame(header: object, body: bytes = b"body", raw_header: bytes | None = None) -> bytes:
    blob = raw_header if raw_header is not None else orjson.dumps(header)
    return MAGIC + struct.pack(">I", len(blob)) + blob + body


def _header(**changes: object) -> dict[str, object]:
    good = Header.of(Entry(b"body", "text/plain", T0, 0, {"a": "b"})).to_json()
    good.update(changes)
    return good


GOOD = encode(entry())

CORRUPT = {
    "empty": b"",
    "shorter than the framing": MAGIC + b"\x00\x00",
    "bad magic": b"CBC2" + GOOD[4:],
    "not ours at all": b'{"answer": 42}',
    "header length past the end": MAGIC + struct.pack(">I", 10_000) + GOOD[8:],
    "truncated body": GOOD[:-1],
    "truncated header": GOOD[:12],
    "extra byte": GOOD + b"!",
    "flipped body bit": GOOD[:-1] + bytes([GOOD[-1] ^ 1]),
    "bad JSON": _frame(None, raw_header=b"{not json"),
    "header not an object": _frame([1, 2, 3]),
    "missing sha256": _frame({k: v for k, v in _header().items() if k != "sha256"}),
    "length not an int": _frame(_header(length="4")),
    "negative length": _frame(_header(length=-1)),
    "length mismatch": _frame(_header(length=3)),
    "checksum mismatch": _frame(_header(sha256=hashlib.sha256(b"other").hexdigest())),
    "short checksum": _frame(_header(sha256="abc")),
    "content_type not a string": _frame(_header(content_type=7)),
    "created_at not a number": _frame(_header(created_at="yesterday")),
    "expires_at a bool": _frame(_header(expires_at=True)),
    "attribute not a string": _frame(_header(attributes={"a": 1})),
    "attributes not an object": _frame(_header(attributes=["a"])),
}


@pytest.mark.parametrize("data", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_entries_are_refused(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode(data)


def test_a_well_formed_frame_decodes() -> None:
    # The corruption cases above differ from this one only in what they break.
    assert decode(_frame(_header())) == Entry(b"body", "text/plain", T0, 0, {"a": "b"})


# --- every level fits the store's protocol ---


@pytest.mark.asyncio
async def test_levels_satisfy_the_protocol(tmp_path: Path) -> None:
    redis_level = RedisLevel("redis://127.0.0.1:1", 60)  # never connects: nothing is called
    levels = [MemoryLevel(1000, 60), redis_level, ObjectLevel(tmp_path, 60)]
    assert [level.name for level in levels] == ["l1", "l2", "l3"]
    assert all(isinstance(level, Level) and level.up for level in levels)
    await redis_level.close()


# --- L1 memory ---


def sized(n: int) -> Entry:
    return entry(b"x" * n)


@pytest.mark.asyncio
async def test_memory_round_trip_and_delete() -> None:
    level = MemoryLevel(10_000, 60)
    assert await level.get("k") is None
    assert await level.put("k", entry())
    assert await level.get("k") == entry()
    assert len(level) == 1
    assert level.bytes_used == entry_cost("k", entry())
    await level.delete("k")
    await level.delete("k")  # deleting what is gone is fine
    assert await level.get("k") is None
    assert (len(level), level.bytes_used) == (0, 0)


@pytest.mark.asyncio
async def test_memory_evicts_least_recently_used() -> None:
    evictions: list[str] = []
    one = entry_cost("a", sized(100))
    level = MemoryLevel(3 * one, 60, on_evict=evictions.append)
    for key in "abc":
        assert await level.put(key, sized(100))
    assert await level.get("a") is not None  # a is now the most recently used; b the least
    assert await level.put("d", sized(100))
    assert await level.get("b") is None
    assert all([await level.get(k) for k in "acd"])
    assert evictions == ["size"]
    # A bigger entry pushes out as many as it needs, oldest first: a, then c.
    assert await level.put("e", sized(100 + one))
    assert [k for k in "acde" if k in level] == ["d", "e"]
    assert evictions == ["size"] * 3
    assert level.bytes_used <= level.max_bytes


@pytest.mark.asyncio
async def test_memory_replacing_a_key_accounts_bytes_once() -> None:
    level = MemoryLevel(10_000, 60)
    await level.put("k", sized(1000))
    await level.put("k", sized(10))
    assert len(level) == 1
    assert level.bytes_used == 10 + ENTRY_OVERHEAD_BYTES + 1


@pytest.mark.asyncio
async def test_memory_ttl_and_entry_expiry() -> None:
    clock = FakeClock()
    evictions: list[str] = []
    level = MemoryLevel(10_000, 30, on_evict=evictions.append, clock=clock)
    await level.put("level-ttl", entry())  # lives 30 s: the level's limit
    await level.put("own-expiry", entry(expires_at=T0 + 10))  # lives 10 s: its own
    clock.advance(9.9)
    assert await level.get("own-expiry") is not None
    clock.advance(0.1)
    assert await level.get("own-expiry") is None
    assert await level.get("level-ttl") is not None
    clock.advance(19.99)
    assert await level.get("level-ttl") is not None
    clock.advance(0.01)
    assert await level.get("level-ttl") is None
    assert evictions == ["expired", "expired"]
    assert (len(level), level.bytes_used) == (0, 0)
    # Already expired: not stored.
    assert not await level.put("late", entry(expires_at=clock.now - 1))
    assert "late" not in level


@pytest.mark.asyncio
async def test_memory_purges_expired_entries() -> None:
    clock = FakeClock()
    evictions: list[str] = []
    level = MemoryLevel(10_000, 5, on_evict=evictions.append, clock=clock)
    await level.put("old", entry())
    clock.advance(3)
    await level.put("new", entry())
    clock.advance(3)
    assert level.purge_expired() == 1
    assert "new" in level and "old" not in level
    assert evictions == ["expired"]


@pytest.mark.asyncio
async def test_memory_evicting_an_expired_entry_counts_as_expired() -> None:
    clock = FakeClock()
    evictions: list[str] = []
    one = entry_cost("a", sized(100))
    level = MemoryLevel(one, 5, on_evict=evictions.append, clock=clock)
    await level.put("a", sized(100))
    clock.advance(10)
    await level.put("b", sized(100))
    assert evictions == ["expired"]


@pytest.mark.asyncio
async def test_memory_refuses_an_entry_larger_than_itself() -> None:
    evictions: list[str] = []
    level = MemoryLevel(1000, 60, on_evict=evictions.append)
    await level.put("small", sized(10))
    before = level.bytes_used
    assert not await level.put("huge", sized(1000))
    assert await level.get("huge") is None
    assert await level.get("small") is not None  # nothing was evicted for it
    assert level.bytes_used == before
    assert evictions == []
    # A refused write still removes the key's old value: it would be stale.
    assert not await level.put("small", sized(1000))
    assert "small" not in level
    assert level.bytes_used == 0


@pytest.mark.asyncio
async def test_memory_byte_bound_holds_under_a_flood() -> None:
    evictions: Counter[str] = Counter()
    level = MemoryLevel(200_000, 60, on_evict=lambda reason: evictions.update([reason]))
    for i in range(10_000):
        assert await level.put(f"key-{i}", sized(i % 700))
        assert level.bytes_used <= level.max_bytes
    assert evictions == {"size": 10_000 - len(level)}
    assert len(level) > 100
    # The accounting matches what is held, and the newest keys are the ones kept.
    kept = [f"key-{i}" for i in range(10_000 - len(level), 10_000)]
    assert level.bytes_used == sum(entry_cost(k, sized(int(k[4:]) % 700)) for k in kept)
    assert all(k in level for k in kept)


# --- L3 objects ---


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


def index_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "index").rglob("*") if p.is_file())


class Recorder:
    def __init__(self) -> None:
        self.corrupt: list[str] = []
        self.states: list[bool] = []

    def level(self, root: Path, ttl_s: float = 3600, **options: object) -> ObjectLevel:
        return ObjectLevel(
            root,
            ttl_s,
            on_corrupt=self.corrupt.append,
            on_state_change=self.states.append,
            **options,  # type: ignore[arg-type]
        )


@pytest.mark.asyncio
async def test_objects_round_trip(tmp_path: Path) -> None:
    level = Recorder().level(tmp_path)
    big = entry(bytes(range(256)) * 4096, expires_at=T0 + 10**9)
    assert await level.get("k") is None
    assert await level.put("k", big)
    assert await level.get("k") == big
    assert await ObjectLevel(tmp_path, 3600).get("k") == big  # another process reads it too
    digest = hashlib.sha256(big.body).hexdigest()
    assert blob_files(tmp_path) == [tmp_path / "blobs" / digest[:2] / digest]
    assert len(index_files(tmp_path)) == 1
    assert not [p for p in blob_files(tmp_path) + index_files(tmp_path) if p.name.startswith(".tmp-")]
    await level.delete("k")
    assert await level.get("k") is None
    await level.delete("k")


@pytest.mark.asyncio
async def test_objects_store_identical_bodies_once(tmp_path: Path) -> None:
    level = Recorder().level(tmp_path)
    same = b"the same long answer" * 1000
    await level.put("a", entry(same, instance="one"))
    await level.put("b", entry(same, instance="two"))
    await level.put("c", entry(b"something else"))
    assert len(blob_files(tmp_path)) == 2
    assert len(index_files(tmp_path)) == 3
    a, b = await level.get("a"), await level.get("b")
    assert a is not None and b is not None
    assert a.body == b.body == same
    assert (a.attributes["instance"], b.attributes["instance"]) == ("one", "two")
    # Deleting one key leaves the shared blob to the other.
    await level.delete("a")
    assert await level.get("a") is None
    assert await level.get("b") == b


@pytest.mark.asyncio
async def test_objects_expiry(tmp_path: Path) -> None:
    clock = FakeClock()
    level = ObjectLevel(tmp_path, 30, clock=clock)
    await level.put("level-ttl", entry(b"one"))
    await level.put("own-expiry", entry(b"two", expires_at=T0 + 10))
    clock.advance(10)
    assert await level.get("own-expiry") is None
    assert await level.get("level-ttl") is not None
    clock.advance(20)
    assert await level.get("level-ttl") is None
    assert index_files(tmp_path) == []  # expired records are removed as they are found
    assert not await level.put("late", entry(expires_at=clock.now - 1))


@pytest.mark.asyncio
async def test_objects_drop_a_corrupt_blob(tmp_path: Path) -> None:
    recorder = Recorder()
    level = recorder.level(tmp_path)
    value = entry(b"a precious answer")
    await level.put("k", value)
    await level.put("other", value)
    [blob] = blob_files(tmp_path)
    blob.write_bytes(b"a precious answeR")  # same size, one bit off
    assert await level.get("k") is None
    assert recorder.corrupt == ["l3"]
    assert blob_files(tmp_path) == []  # the bad blob is gone, so a new put rewrites it
    assert await level.get("other") is None  # its blob is gone: dropped, counted
    assert recorder.corrupt == ["l3", "l3"]
    assert index_files(tmp_path) == []
    assert await level.put("k", value)
    assert await level.get("k") == value


@pytest.mark.asyncio
async def test_objects_drop_a_corrupt_index_record(tmp_path: Path) -> None:
    recorder = Recorder()
    level = recorder.level(tmp_path)
    await level.put("k", entry())
    [record] = index_files(tmp_path)
    record.write_bytes(b'{"key": "k", "stored_at": 1, "header": {"content_type": 1}}')
    assert await level.get("k") is None
    assert recorder.corrupt == ["l3"]
    assert index_files(tmp_path) == []
    assert recorder.states == []  # a bad file is not a bad directory


@pytest.mark.asyncio
async def test_objects_rewrite_a_truncated_blob_on_put(tmp_path: Path) -> None:
    level = ObjectLevel(tmp_path, 3600)
    value = entry(b"0123456789")
    await level.put("k", value)
    [blob] = blob_files(tmp_path)
    blob.write_bytes(b"01234")
    assert await level.put("k2", value)
    assert blob.read_bytes() == value.body
    assert await level.get("k") == value


@pytest.mark.asyncio
async def test_objects_unwritable_directory_then_recovers(tmp_path: Path) -> None:
    # chmod does not stop root, so the parent of the root is a regular file instead.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    root = blocker / "cache"
    clock = FakeClock(0.0)
    recorder = Recorder()
    level = recorder.level(root, retry_after_s=5, monotonic=clock)
    assert not await level.put("k", entry())
    assert recorder.states == [False]
    assert not level.up
    assert await level.get("k") is None  # reads are misses, never errors
    await level.delete("k")
    # Fixed, but inside the retry window writes are still refused without trying.
    blocker.unlink()
    blocker.mkdir()
    clock.advance(4.9)
    assert not await level.put("k", entry())
    assert not root.exists()
    assert recorder.states == [False]
    clock.advance(0.1)
    assert await level.put("k", entry())
    assert recorder.states == [False, True]
    assert level.up
    assert await level.get("k") == entry()


@pytest.mark.asyncio
async def test_objects_failed_retry_stays_down_quietly(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    clock = FakeClock(0.0)
    recorder = Recorder()
    level = recorder.level(blocker / "cache", retry_after_s=1, monotonic=clock)
    for _ in range(3):
        assert not await level.put("k", entry())
        clock.advance(1)
    assert recorder.states == [False]  # one report per change, not per failure


@pytest.mark.asyncio
async def test_objects_sweep_removes_unreferenced_blobs(tmp_path: Path) -> None:
    clock = FakeClock()
    level = ObjectLevel(tmp_path, 60, clock=clock)
    await level.put("kept", entry(b"kept"))
    await level.put("deleted", entry(b"deleted"))
    await level.put("expiring", entry(b"expiring", expires_at=T0 + 1))
    await level.delete("deleted")
    (tmp_path / "blobs" / "00").mkdir(parents=True, exist_ok=True)
    (tmp_path / "blobs" / "00" / ".tmp-left-behind").write_bytes(b"half")
    # Young blobs stay: a put may be about to refer to one.
    assert await level.sweep(max_age_s=3600) == 0
    assert len(blob_files(tmp_path)) == 4
    clock.advance(2)
    assert await level.sweep(max_age_s=0) == 2
    assert [p.name for p in blob_files(tmp_path)] == [hashlib.sha256(b"kept").hexdigest()]
    assert len(index_files(tmp_path)) == 1
    assert await level.get("kept") == entry(b"kept")


@pytest.mark.asyncio
async def test_objects_sweep_of_a_missing_root(tmp_path: Path) -> None:
    level = ObjectLevel(tmp_path / "never-written", 60)
    assert await level.sweep(0) == 0
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert await level.get("k") is None
