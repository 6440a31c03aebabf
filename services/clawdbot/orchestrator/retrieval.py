"""Retrieval for the orchestrator's workflows: markdown files in, the closest passages out.

A folder of markdown files is cut into heading-sized chunks, embedded by a caller-supplied
function (in production all-MiniLM-L6-v2 through the router: 384 floats, unit length) and
stored in Qdrant with cosine distance. `KnowledgeBase.search` embeds the question and
returns the nearest chunks.

Qdrant runs embedded in this process by default (qdrant-client's local mode, on disk at
`path` or in memory) or as a server at `url`; both go through the same `AsyncQdrantClient`
calls. Local mode is not safe for two processes on one path: the client takes an exclusive
lock on the directory, so a second process fails with RetrievalUnavailable; run one
orchestrator per local path, and a Qdrant server when several must share a knowledge base.
Local mode also does its work synchronously inside its async methods, so calls block the
event loop; at this size (tens of chunks) a search takes well under a millisecond.

Versioning: the `collection` name is a Qdrant alias. Each distinct content of the folder is
built into its own physical collection, `<collection>-<first 16 hex of its content hash>`,
and the alias is switched to it only once every point is in, then older builds are dropped.
So a restart with unchanged files finds the alias already on the right build and embeds
nothing; an edited folder is rebuilt while searches keep reading the previous build; and a
build that crashed half way is never what the alias points at. Aliases need no collection
metadata, so any Qdrant server version that qdrant-client 1.20 talks to will do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import grpc
import httpx
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ApiException, UnexpectedResponse

log = logging.getLogger(__name__)

Embed = Callable[[list[str]], Awaitable[list[list[float]]]]

# Bump when the chunk text or payload layout changes: it is part of the content hash, so
# every existing knowledge base is rebuilt on the next ingest instead of mixing layouts.
_LAYOUT_VERSION: Final = 1
_EMBED_BATCH: Final = 32
_MIN_CHARS: Final = 40
_HASH_CHARS: Final = 16
_COLLECTION_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")

_HEADING: Final = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE: Final = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# How an oversized paragraph is cut, coarsest first: lines (list items), sentences, words.
# What is left after words (one enormous token) is cut at the character limit.
_SPLITTERS: Final = (
    (re.compile(r"\n"), "\n"),
    (re.compile(r"(?<=[.!?;:])\s+"), " "),
    (re.compile(r"\s+"), " "),
)


class RetrievalUnavailable(Exception):
    """The knowledge base cannot be built or searched: say why, for the operator or the workflow."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Chunk:
    id: str  # 32 hex digits of sha256(source, index): stable for a file's n-th chunk
    source: str  # the file's path relative to the knowledge folder, with '/'
    title: str  # the heading path, "Rooms and lights > Ground floor"; the file stem without headings
    text: str  # the title line, a blank line, then the passage: what is embedded and returned


@dataclass(frozen=True, slots=True)
class Hit:
    text: str
    source: str
    title: str
    score: float  # cosine similarity, higher is closer


# --- chunking ---------------------------------------------------------------------------


def chunk_markdown(text: str, source: str, max_chars: int = 800) -> list[Chunk]:
    """Cut markdown into chunks of at most `max_chars` characters, each under its headings.

    A chunk never spans two sections, so its title is right for all of it; paragraphs of a
    section are packed together up to the limit, and a paragraph too long on its own is cut
    at lines, then sentences, then words. ATX headings (`#`…) only; `#` lines inside fenced
    code blocks are code, not headings.
    """
    if max_chars < _MIN_CHARS:
        raise ValueError(f"max_chars must be at least {_MIN_CHARS}, got {max_chars}")
    fallback_title = Path(source).stem
    chunks: list[Chunk] = []
    for headings, paragraphs in _sections(text):
        title = " > ".join(headings) or fallback_title
        prefix = _shorten(title, max_chars // 2)
        budget = max_chars - len(prefix) - 2  # the blank line between title and passage
        pieces = [piece for paragraph in paragraphs for piece in _split(paragraph, budget, 0)]
        for body in _pack(pieces, budget, "\n\n"):
            index = len(chunks)
            chunk_id = hashlib.sha256(f"{source}\0{index}".encode()).hexdigest()[:32]
            chunks.append(Chunk(id=chunk_id, source=source, title=title, text=f"{prefix}\n\n{body}"))
    return chunks


def _sections(text: str) -> Iterator[tuple[list[str], list[str]]]:
    """(heading path, paragraphs) for every section that has some text."""
    path: list[tuple[int, str]] = []
    paragraphs: list[str] = []
    lines: list[str] = []
    fence: str | None = None

    def end_paragraph() -> None:
        if lines:
            paragraphs.append("\n".join(lines).strip("\n"))
            lines.clear()

    def section() -> tuple[list[str], list[str]]:
        end_paragraph()
        found = ([h for _, h in path], [p for p in paragraphs if p.strip()])
        paragraphs.clear()
        return found

    for raw in text.splitlines():
        line = raw.rstrip()
        if fence is not None:
            lines.append(line)
            if line.lstrip().startswith(fence):
                fence = None
            continue
        if opening := _FENCE.match(line):
            fence = opening.group(1)
            lines.append(line)
            continue
        if heading := _HEADING.match(line):
            headings, body = section()
            if body:
                yield headings, body
            level = len(heading.group(1))
            while path and path[-1][0] >= level:
                path.pop()
            if name := (heading.group(2) or "").strip():
                path.append((level, name))
            continue
        if line.strip():
            lines.append(line)
        else:
            end_paragraph()
    headings, body = section()
    if body:
        yield headings, body


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _split(text: str, limit: int, level: int) -> list[str]:
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    if level == len(_SPLITTERS):
        return [text[i : i + limit] for i in range(0, len(text), limit)]
    pattern, joiner = _SPLITTERS[level]
    parts = pattern.split(text)
    if len(parts) == 1:
        return _split(text, limit, level + 1)
    return _pack([piece for part in parts for piece in _split(part, limit, level + 1)], limit, joiner)


def _pack(pieces: Sequence[str], limit: int, joiner: str) -> list[str]:
    """Join consecutive pieces while the result stays within `limit`; each piece already fits."""
    packed: list[str] = []
    current = ""
    for piece in pieces:
        if not current:
            current = piece
        elif len(current) + len(joiner) + len(piece) <= limit:
            current = f"{current}{joiner}{piece}"
        else:
            packed.append(current)
            current = piece
    if current:
        packed.append(current)
    return packed


def load_folder(folder: Path, max_chars: int = 800) -> list[Chunk]:
    """Every chunk of every `*.md` under `folder` (hidden files and directories skipped), in path order."""
    if not folder.is_dir():
        raise RetrievalUnavailable(f"knowledge folder {folder} does not exist or is not a directory")
    relative = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*.md")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not relative:
        raise RetrievalUnavailable(f"knowledge folder {folder} has no *.md files")
    chunks: list[Chunk] = []
    for source in relative:
        try:
            text = (folder / source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RetrievalUnavailable(f"cannot read knowledge file {folder / source}: {exc}") from exc
        chunks.extend(chunk_markdown(text, source, max_chars))
    if not chunks:
        raise RetrievalUnavailable(f"the *.md files in knowledge folder {folder} have no text")
    return chunks


def content_hash(chunks: Sequence[Chunk], embedder_id: str) -> str:
    """What a build of the knowledge base depends on: the layout, the embedder and every chunk."""
    digest = hashlib.sha256(json.dumps([_LAYOUT_VERSION, embedder_id]).encode())
    for chunk in chunks:
        digest.update(json.dumps([chunk.id, chunk.source, chunk.title, chunk.text]).encode())
    return digest.hexdigest()


# --- the store --------------------------------------------------------------------------


class KnowledgeBase:
    """A folder of markdown, searchable by meaning, kept in one Qdrant collection alias.

    `path` (a directory) or neither (in memory) runs Qdrant in this process; `url` (with an
    optional `api_key`) uses a Qdrant server. `embedder_id` names the embedding model (say
    "all-minilm-l6-v2@0.1.2"): it is part of the content hash, so changing the model
    rebuilds the vectors even when no file changed.

    One process per local `path`: local mode locks the directory, and a second process
    (or a second instance here) gets RetrievalUnavailable. Not for concurrent ingests of one
    server collection from several processes either: the last build wins and may drop
    another's build in progress. Searches from any number of processes are fine.
    """

    def __init__(
        self,
        collection: str,
        embed: Embed,
        *,
        path: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        embedder_id: str = "",
        max_chars: int = 800,
        timeout_s: int = 10,
    ) -> None:
        if not _COLLECTION_NAME.fullmatch(collection):
            raise ValueError(f"collection name {collection!r} must be letters, digits, '_', '-' or '.'")
        if path is not None and url is not None:
            raise ValueError("give a local path or a server url for the knowledge base, not both")
        if api_key is not None and url is None:
            raise ValueError("an api_key needs a server url")
        if max_chars < _MIN_CHARS:
            raise ValueError(f"max_chars must be at least {_MIN_CHARS}, got {max_chars}")
        self._collection = collection
        self._embed = embed
        self._path = path
        self._url = url
        self._api_key = api_key
        self._embedder_id = embedder_id
        self._max_chars = max_chars
        self._timeout_s = timeout_s
        self._client: AsyncQdrantClient | None = None
        self._closed = False
        self._ingesting = asyncio.Lock()
        # Builds of this knowledge base, as opposed to other collections sharing a server.
        self._build_name = re.compile(re.escape(collection) + rf"-[0-9a-f]{{{_HASH_CHARS}}}")
        self._where = f"Qdrant at {url}" if url else f"local Qdrant in {path or 'memory'}"

    async def __aenter__(self) -> KnowledgeBase:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def collection(self) -> str:
        return self._collection

    async def ingest(self, folder: Path) -> int:
        """Make the collection hold exactly the chunks of `folder`; return how many there are.

        Embeds nothing when the collection already holds this content (same files, chunking
        and embedder); otherwise builds it afresh and switches to it.
        """
        started = time.perf_counter()
        chunks = await asyncio.to_thread(load_folder, Path(folder), self._max_chars)
        target = f"{self._collection}-{content_hash(chunks, self._embedder_id)[:_HASH_CHARS]}"
        async with self._ingesting:
            client = self._connect()
            with self._errors("ingest"):
                current = await self._alias_target(client)
                if current == target and await self._holds(client, target, len(chunks)):
                    log.info("knowledge base %s is up to date (%d chunks, %s)", self._collection, len(chunks), target)
                else:
                    await self._build(client, target, chunks)
                    await self._switch_alias(client, current, target)
                    log.info(
                        "knowledge base %s rebuilt as %s: %d chunks in %.2fs",
                        self._collection,
                        target,
                        len(chunks),
                        time.perf_counter() - started,
                    )
                await self._drop_other_builds(client, target)
        return len(chunks)

    async def search(self, query: str, top_k: int = 3, min_score: float | None = None) -> list[Hit]:
        """The `top_k` chunks nearest to `query`, best first, leaving out any scoring below `min_score`."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        client = self._connect()
        (vector,) = await self._embed_batch([query])
        with self._errors("search"):
            try:
                response = await client.query_points(
                    self._collection,
                    query=vector,
                    limit=top_k,
                    score_threshold=min_score,
                    with_payload=True,
                )
            except UnexpectedResponse as exc:
                if exc.status_code == 404:
                    raise self._not_ingested() from exc
                raise
            except ValueError as exc:  # local mode's "Collection ... not found"
                raise self._not_ingested() from exc
        hits = []
        for point in response.points:
            payload = point.payload or {}
            hits.append(
                Hit(
                    text=str(payload.get("text", "")),
                    source=str(payload.get("source", "")),
                    title=str(payload.get("title", "")),
                    score=float(point.score),
                )
            )
        return hits

    async def count(self) -> int:
        """Chunks in the collection the alias points at."""
        client = self._connect()
        with self._errors("count"):
            try:
                return (await client.count(self._collection, exact=True)).count
            except UnexpectedResponse as exc:
                if exc.status_code == 404:
                    raise self._not_ingested() from exc
                raise
            except ValueError as exc:
                raise self._not_ingested() from exc

    async def close(self) -> None:
        """Release the client (and local mode's lock on its directory). Safe to call twice."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # --- internals ----------------------------------------------------------------------

    def _connect(self) -> AsyncQdrantClient:
        # Made on first use rather than in __init__: local mode opens and locks its directory
        # when constructed, and that failure belongs with the other RetrievalUnavailable ones.
        if self._closed:
            raise RetrievalUnavailable(f"knowledge base {self._collection} is closed")
        if self._client is not None:
            return self._client
        try:
            if self._url is not None:
                # check_compatibility would fetch the server version from a thread and only
                # warn; an unreachable server is reported by the first real call instead.
                self._client = AsyncQdrantClient(
                    url=self._url, api_key=self._api_key, timeout=self._timeout_s, check_compatibility=False
                )
            elif self._path is not None:
                self._client = AsyncQdrantClient(path=self._path)
            else:
                self._client = AsyncQdrantClient(location=":memory:")
        except RuntimeError as exc:
            # qdrant-client's message for a locked directory: "... already accessed by another instance".
            raise RetrievalUnavailable(
                f"local Qdrant storage {self._path} is in use by another process ({exc}); "
                "give each orchestrator its own path, or share a Qdrant server"
            ) from exc
        except OSError as exc:
            raise RetrievalUnavailable(f"cannot open {self._where}: {exc}") from exc
        return self._client

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except RetrievalUnavailable:
            raise
        except (ApiException, httpx.HTTPError, grpc.RpcError, OSError) as exc:
            # ResponseHandlingException (connection refused, timeouts) keeps the cause in .source.
            cause = getattr(exc, "source", None) or exc
            raise RetrievalUnavailable(
                f"{self._where}: {action} of knowledge base {self._collection} failed: {type(cause).__name__}: {cause}"
            ) from exc

    def _not_ingested(self) -> RetrievalUnavailable:
        return RetrievalUnavailable(f"{self._where} has no knowledge base {self._collection}: it was never ingested")

    async def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        try:
            vectors = await self._embed(texts)
        except (asyncio.CancelledError, RetrievalUnavailable):
            raise
        except Exception as exc:
            # The workflow treats every way retrieval can fail alike; the cause stays chained.
            raise RetrievalUnavailable(f"embedding for knowledge base {self._collection} failed: {exc}") from exc
        if len(vectors) != len(texts) or any(len(v) != len(vectors[0]) or not v for v in vectors):
            raise RetrievalUnavailable(
                f"the embedder returned {len(vectors)} vectors of sizes {sorted({len(v) for v in vectors})} "
                f"for {len(texts)} texts; expected one vector of one size per text"
            )
        return [[float(x) for x in v] for v in vectors]

    async def _alias_target(self, client: AsyncQdrantClient) -> str | None:
        names = {c.name for c in (await client.get_collections()).collections}
        if self._collection in names:
            # Not made by this class (it only makes aliases by that name); deleting it could
            # destroy someone's data, so the operator decides.
            raise RetrievalUnavailable(
                f"{self._where} has a collection named {self._collection}, where the knowledge base "
                "keeps an alias; delete that collection or choose another name"
            )
        for alias in (await client.get_aliases()).aliases:
            if alias.alias_name == self._collection:
                return alias.collection_name
        return None

    async def _holds(self, client: AsyncQdrantClient, target: str, expected: int) -> bool:
        # The alias only ever moves to a complete build, so a mismatch means someone changed
        # the collection by hand; rebuilding is cheaper than reasoning about what they did.
        return (await client.count(target, exact=True)).count == expected

    async def _build(self, client: AsyncQdrantClient, target: str, chunks: Sequence[Chunk]) -> None:
        # An existing collection of this name holds (part of) this very content, left by a
        # crash or written by a concurrent ingest: upserting the same ids completes it.
        ready = False
        for start in range(0, len(chunks), _EMBED_BATCH):
            batch = chunks[start : start + _EMBED_BATCH]
            vectors = await self._embed_batch([c.text for c in batch])
            if not ready:
                await self._ensure_collection(client, target, len(vectors[0]))
                ready = True
            await client.upsert(
                target,
                points=[
                    models.PointStruct(
                        id=str(uuid.UUID(hex=chunk.id)),
                        vector=vector,
                        payload={"source": chunk.source, "title": chunk.title, "text": chunk.text},
                    )
                    for chunk, vector in zip(batch, vectors, strict=True)
                ],
                wait=True,
            )

    async def _ensure_collection(self, client: AsyncQdrantClient, target: str, dimensions: int) -> None:
        if await client.collection_exists(target):
            params = (await client.get_collection(target)).config.params.vectors
            if isinstance(params, models.VectorParams) and params.size == dimensions:
                return
            await client.delete_collection(target)
        try:
            await client.create_collection(
                target, vectors_config=models.VectorParams(size=dimensions, distance=models.Distance.COSINE)
            )
        except (ApiException, ValueError):
            # Another ingest of the same content created it first; its points are ours too.
            if not await client.collection_exists(target):
                raise

    async def _switch_alias(self, client: AsyncQdrantClient, current: str | None, target: str) -> None:
        operations: list[models.AliasOperations] = []
        if current is not None:
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self._collection)))
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=target, alias_name=self._collection)
            )
        )
        # One request, so a server applies both at once and a search never finds no alias.
        await client.update_collection_aliases(change_aliases_operations=operations)

    async def _drop_other_builds(self, client: AsyncQdrantClient, keep: str) -> None:
        for description in (await client.get_collections()).collections:
            name = description.name
            if name != keep and self._build_name.fullmatch(name):
                log.info("knowledge base %s: dropping old build %s", self._collection, name)
                await client.delete_collection(name)
