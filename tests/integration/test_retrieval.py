"""The knowledge base on a real Qdrant (local mode, in memory and on disk) with real all-MiniLM-L6-v2 vectors.

No test here needs a Qdrant server: the server code path differs only in how the client is
made, and an unreachable URL is tested for its error.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from qdrant_client import AsyncQdrantClient

from clawdbot.orchestrator.retrieval import KnowledgeBase, RetrievalUnavailable, load_folder
from clawdbot.worker.runtimes.minilm import MiniLM

ROOT = Path(__file__).resolve().parents[2]
KNOWLEDGE = ROOT / "config" / "knowledge"
MODEL_CACHE = ROOT / ".clawdbot" / "models" / "all-minilm-l6-v2"


class Embedder:
    """all-MiniLM-L6-v2 as the knowledge base sees it, counting calls; vectors are memoised
    across tests (they are deterministic) so the suite embeds each text once."""

    def __init__(self, model: MiniLM, memo: dict[str, list[float]]) -> None:
        self._model = model
        self._memo = memo
        self.calls: list[int] = []  # batch sizes
        self.fail_on_call: int | None = None

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(len(texts))
        if self.fail_on_call is not None and len(self.calls) >= self.fail_on_call:
            raise ConnectionError("router went away")
        missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if missing:
            for text, vector in zip(missing, self._model.embed(missing).tolist(), strict=True):
                self._memo[text] = vector
        return [self._memo[t] for t in texts]

    @property
    def texts_embedded(self) -> int:
        return sum(self.calls)


@pytest.fixture(scope="module")
def model() -> MiniLM:
    return MiniLM.load(MODEL_CACHE)


@pytest.fixture(scope="module")
def memo() -> dict[str, list[float]]:
    return {}


@pytest.fixture
def embedder(model: MiniLM, memo: dict[str, list[float]]) -> Embedder:
    return Embedder(model, memo)


@pytest.fixture(params=["memory", "path"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    return None if request.param == "memory" else str(tmp_path / "qdrant")


@pytest_asyncio.fixture
async def kb(embedder: Embedder, storage: str | None) -> AsyncIterator[KnowledgeBase]:
    base = KnowledgeBase("knowledge", embedder, path=storage)
    yield base
    await base.close()


def copy_knowledge(tmp_path: Path) -> Path:
    folder = tmp_path / "knowledge"
    shutil.copytree(KNOWLEDGE, folder)
    return folder


async def physical_collections(path: str) -> tuple[list[str], dict[str, str]]:
    client = AsyncQdrantClient(path=path)
    try:
        names = sorted(c.name for c in (await client.get_collections()).collections)
        aliases = {a.alias_name: a.collection_name for a in (await client.get_aliases()).aliases}
        return names, aliases
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_questions_find_the_right_file(kb: KnowledgeBase, embedder: Embedder) -> None:
    expected = len(load_folder(KNOWLEDGE))
    started = time.perf_counter()
    assert await kb.ingest(KNOWLEDGE) == expected
    print(f"ingest of {expected} chunks: {time.perf_counter() - started:.2f}s")  # shown with -s
    assert await kb.count() == expected
    assert embedder.texts_embedded == expected
    assert max(embedder.calls) <= 32

    cases = {
        "which lights are in the kitchen?": "rooms-and-lights.md",
        "how do I set a timer?": "timers-and-alarms.md",
        "what can you do?": "about-clawdbot.md",
        "will it rain tomorrow?": "weather.md",
        "the lamp does not turn on": "light-troubleshooting.md",
        "when does Leo go to bed?": "family-routines.md",
    }
    for question, source in cases.items():
        hits = await kb.search(question)
        assert hits, question
        assert hits[0].source == source, (question, [(h.source, h.title, h.score) for h in hits])

    (top,) = await kb.search("which lights are in the kitchen?", top_k=1)
    assert "pendant" in top.text
    assert top.title == "Rooms and lights > Ground floor"
    assert top.text.startswith(top.title)
    assert 0.0 < top.score <= 1.0


@pytest.mark.asyncio
async def test_reingest_is_idempotent_and_embeds_nothing(kb: KnowledgeBase, embedder: Embedder) -> None:
    first = await kb.ingest(KNOWLEDGE)
    calls = len(embedder.calls)
    assert await kb.ingest(KNOWLEDGE) == first
    assert await kb.count() == first
    assert len(embedder.calls) == calls


@pytest.mark.asyncio
async def test_restart_on_the_same_path_embeds_nothing(tmp_path: Path, embedder: Embedder) -> None:
    path = str(tmp_path / "qdrant")
    async with KnowledgeBase("knowledge", embedder, path=path) as first:
        count = await first.ingest(KNOWLEDGE)
    calls = len(embedder.calls)

    async with KnowledgeBase("knowledge", embedder, path=path) as second:
        assert await second.count() == count  # searchable before any ingest: it is on disk
        assert await second.ingest(KNOWLEDGE) == count
        assert len(embedder.calls) == calls
        hits = await second.search("how do I set a timer?", top_k=1)
    assert hits[0].source == "timers-and-alarms.md"
    assert len(embedder.calls) == calls + 1  # the question only


@pytest.mark.asyncio
async def test_a_changed_folder_is_rebuilt(tmp_path: Path, embedder: Embedder) -> None:
    folder = copy_knowledge(tmp_path)
    path = str(tmp_path / "qdrant")
    async with KnowledgeBase("knowledge", embedder, path=path) as kb:
        before = await kb.ingest(folder)
        embedded = embedder.texts_embedded

        rooms = folder / "rooms-and-lights.md"
        rooms.write_text(
            rooms.read_text()
            + "\n## Garage\n\nThe garage has two fluorescent tube lights and a workbench lamp.\n"
            + "\nThe garage door opener is on the wall by the utility room.\n"
        )
        after = await kb.ingest(folder)
        assert after == before + 1
        assert await kb.count() == after
        # A rebuild embeds the whole folder again.
        assert embedder.texts_embedded == embedded + after
        (hit,) = await kb.search("what lights are in the garage?", top_k=1)
        assert hit.title == "Rooms and lights > Garage"
        assert "fluorescent" in hit.text

        # Removing a file drops its chunks too.
        (folder / "garden.md").unlink()
        fewer = await kb.ingest(folder)
        assert await kb.count() == fewer < after
        assert all(h.source != "garden.md" for h in await kb.search("water the garden", top_k=5))

    names, aliases = await physical_collections(path)
    assert len(names) == 1  # the older builds are gone
    assert aliases == {"knowledge": names[0]}
    assert names[0].startswith("knowledge-")


@pytest.mark.asyncio
async def test_a_new_embedder_id_rebuilds(embedder: Embedder) -> None:
    async with KnowledgeBase("knowledge", embedder, embedder_id="minilm@1") as kb:
        count = await kb.ingest(KNOWLEDGE)
        embedded = embedder.texts_embedded
        await kb.ingest(KNOWLEDGE)
        assert embedder.texts_embedded == embedded
    async with KnowledgeBase("knowledge", embedder, embedder_id="minilm@2") as kb:
        await kb.ingest(KNOWLEDGE)
    assert embedder.texts_embedded == embedded + count


@pytest.mark.asyncio
async def test_a_failed_rebuild_leaves_the_previous_build_searchable(tmp_path: Path, embedder: Embedder) -> None:
    folder = copy_knowledge(tmp_path)
    async with KnowledgeBase("knowledge", embedder) as kb:
        count = await kb.ingest(folder)
        (folder / "timers-and-alarms.md").write_text("# Timers\n\nTimers were removed.\n")
        embedder.fail_on_call = len(embedder.calls) + 2  # the second batch of the rebuild
        with pytest.raises(RetrievalUnavailable, match=r"embedding .* failed: router went away"):
            await kb.ingest(folder)
        embedder.fail_on_call = None
        assert await kb.count() == count
        (hit,) = await kb.search("how do I set a timer?", top_k=1)
        assert hit.title == "Timers and alarms > Setting a timer"

        # The next ingest finishes the job and switches over.
        assert await kb.ingest(folder) < count
        (hit,) = await kb.search("how do I set a timer?", top_k=1)
        assert hit.text == "Timers\n\nTimers were removed."


@pytest.mark.asyncio
async def test_top_k_and_min_score(kb: KnowledgeBase) -> None:
    await kb.ingest(KNOWLEDGE)
    question = "which lights are in the kitchen?"
    assert len(await kb.search(question, top_k=1)) == 1
    five = await kb.search(question, top_k=5)
    assert len(five) == 5
    scores = [h.score for h in five]
    assert scores == sorted(scores, reverse=True)
    assert len(await kb.search(question)) == 3

    threshold = (scores[1] + scores[2]) / 2
    kept = await kb.search(question, top_k=5, min_score=threshold)
    assert [h.score for h in kept] == scores[:2]
    assert await kb.search(question, top_k=5, min_score=0.99) == []
    with pytest.raises(ValueError, match="top_k"):
        await kb.search(question, top_k=0)


@pytest.mark.asyncio
async def test_search_before_ingest_is_unavailable(kb: KnowledgeBase) -> None:
    with pytest.raises(RetrievalUnavailable, match="never ingested"):
        await kb.search("anything")
    with pytest.raises(RetrievalUnavailable, match="never ingested"):
        await kb.count()


@pytest.mark.asyncio
async def test_missing_folder_is_unavailable(kb: KnowledgeBase, tmp_path: Path) -> None:
    with pytest.raises(RetrievalUnavailable, match="does not exist"):
        await kb.ingest(tmp_path / "nowhere")


@pytest.mark.asyncio
async def test_two_instances_on_one_path_are_refused(tmp_path: Path, embedder: Embedder) -> None:
    path = str(tmp_path / "qdrant")
    async with KnowledgeBase("knowledge", embedder, path=path) as first:
        await first.ingest(KNOWLEDGE)
        async with KnowledgeBase("knowledge", embedder, path=path) as second:
            with pytest.raises(RetrievalUnavailable, match="in use by another process"):
                await second.search("anything")
        # The refused one did not disturb the owner.
        assert (await first.search("how do I set a timer?", top_k=1))[0].source == "timers-and-alarms.md"


@pytest.mark.asyncio
async def test_an_unreachable_server_is_unavailable(embedder: Embedder) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"https://127.0.0.1:{port}"
    async with KnowledgeBase("knowledge", embedder, url=url, api_key="s3cret-key") as kb:
        started = time.perf_counter()
        with pytest.raises(RetrievalUnavailable, match=rf"Qdrant at {re.escape(url)}: ingest .* failed") as ingest:
            await kb.ingest(KNOWLEDGE)
        with pytest.raises(RetrievalUnavailable, match=r"search .* failed") as search:
            await kb.search("how do I set a timer?")
        assert time.perf_counter() - started < 5.0  # refused, not timed out
    for failure in (ingest.value, search.value):
        assert "ConnectError" in failure.message
        assert "s3cret-key" not in failure.message


@pytest.mark.asyncio
async def test_a_closed_knowledge_base_refuses_work(embedder: Embedder) -> None:
    kb = KnowledgeBase("knowledge", embedder)
    await kb.ingest(KNOWLEDGE)
    await kb.close()
    await kb.close()
    with pytest.raises(RetrievalUnavailable, match="closed"):
        await kb.search("anything")


@pytest.mark.asyncio
async def test_searches_run_while_a_rebuild_is_in_progress(tmp_path: Path, model: MiniLM) -> None:
    folder = copy_knowledge(tmp_path)
    gate = asyncio.Event()
    blocking = False

    async def embed(texts: list[str]) -> list[list[float]]:
        if blocking and len(texts) > 1:
            await gate.wait()
        return model.embed(texts).tolist()

    async with KnowledgeBase("knowledge", embed) as kb:
        count = await kb.ingest(folder)
        (folder / "weather.md").write_text("# Weather\n\nThere is no weather service any more.\n")
        blocking = True
        rebuild = asyncio.create_task(kb.ingest(folder))
        await asyncio.sleep(0.05)
        assert not rebuild.done()
        # The alias still points at the complete previous build.
        assert await kb.count() == count
        (hit,) = await kb.search("which weather service do you use?", top_k=1)
        assert hit.title == "Weather" and "Open-Meteo" in hit.text
        gate.set()
        await rebuild
        (hit,) = await kb.search("which weather service do you use?", top_k=1)
        assert hit.text == "Weather\n\nThere is no weather service any more."
