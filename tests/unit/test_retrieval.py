"""Markdown chunking and folder loading for retrieval: headings kept, sizes bounded, ids stable."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from clawdbot.orchestrator.retrieval import (
    Chunk,
    KnowledgeBase,
    RetrievalUnavailable,
    chunk_markdown,
    content_hash,
    load_folder,
)

KNOWLEDGE = Path(__file__).resolve().parents[2] / "config" / "knowledge"

DOC = """\
# Rooms

Intro to the house.

## Kitchen

Three pendant lights over the island.

The cabinet strip is on a motion sensor.

### Appliances

The oven and the coffee machine.

## Hallway

Two ceiling lights.
"""


def bodies(chunks: list[Chunk]) -> list[str]:
    return [c.text.split("\n\n", 1)[1] for c in chunks]


def words(text: str) -> list[str]:
    return text.split()


async def never_embed(texts: list[str]) -> list[list[float]]:
    raise AssertionError("not called")


def test_heading_path_is_the_title_and_leads_the_text() -> None:
    chunks = chunk_markdown(DOC, "rooms.md")
    assert [c.title for c in chunks] == [
        "Rooms",
        "Rooms > Kitchen",
        "Rooms > Kitchen > Appliances",
        "Rooms > Hallway",  # a sibling heading replaces Kitchen and its children
    ]
    for chunk in chunks:
        assert chunk.text.startswith(chunk.title + "\n\n")
        assert chunk.source == "rooms.md"
        assert "#" not in chunk.text
    # Paragraphs of one section share a chunk when they fit.
    assert bodies(chunks)[1] == "Three pendant lights over the island.\n\nThe cabinet strip is on a motion sensor."


def test_headings_without_text_only_name_their_children() -> None:
    chunks = chunk_markdown("# A\n\n## B\n\n### C ###\n\nbody\n", "x.md")
    assert [(c.title, c.text) for c in chunks] == [("A > B > C", "A > B > C\n\nbody")]


def test_no_headings_titles_with_the_file_stem() -> None:
    chunks = chunk_markdown("Just a note.\n\nAnd another.", "notes/house-facts.md")
    assert [c.title for c in chunks] == ["house-facts"]
    assert bodies(chunks) == ["Just a note.\n\nAnd another."]


def test_empty_and_blank_text_give_no_chunks() -> None:
    assert chunk_markdown("", "a.md") == []
    assert chunk_markdown("\n  \n# Only a heading\n\n", "a.md") == []


def test_hashes_inside_code_fences_are_not_headings() -> None:
    text = "# Setup\n\n```sh\n# install it\npip install x\n\n# run it\n```\n\nDone.\n"
    chunks = chunk_markdown(text, "setup.md")
    assert [c.title for c in chunks] == ["Setup"]
    assert "# install it" in chunks[0].text
    assert "# run it" in chunks[0].text


@pytest.mark.parametrize("max_chars", [40, 120, 800])
def test_every_chunk_fits_and_no_words_are_lost(max_chars: int) -> None:
    long_sentences = " ".join(f"Sentence number {i} says something about the lights." for i in range(60))
    long_list = "\n".join(f"- item {i}: the lamp in room {i}" for i in range(40))
    one_huge_word = "x" * 3000
    text = f"# Title\n\n{long_sentences}\n\n## List\n\n{long_list}\n\n## Blob\n\n{one_huge_word}\n\nshort tail\n"
    chunks = chunk_markdown(text, "big.md", max_chars=max_chars)
    assert all(len(c.text) <= max_chars for c in chunks)
    rebuilt = "".join("".join(words(b)) for b in bodies(chunks))
    expected = "".join(words(long_sentences) + words(long_list) + [one_huge_word, "short", "tail"])
    assert rebuilt == expected
    if max_chars >= 120:
        # Oversized paragraphs are cut at sentence and line boundaries, not mid-word.
        sentence_chunks = [b for c, b in zip(chunks, bodies(chunks), strict=True) if c.title == "Title"]
        assert all(
            re.fullmatch(r"(Sentence number \d+ says something about the lights\. ?)+", b) for b in sentence_chunks
        )
        list_chunks = [b for c, b in zip(chunks, bodies(chunks), strict=True) if c.title == "Title > List"]
        assert all(line.startswith("- item ") for b in list_chunks for line in b.split("\n"))


def test_a_long_title_is_shortened_in_the_text_but_kept_in_full() -> None:
    title = "A heading that goes on " * 10
    chunks = chunk_markdown(f"# {title}\n\nBody text.", "t.md", max_chars=100)
    assert chunks[0].title == title.strip()
    assert len(chunks[0].text) <= 100
    assert chunks[0].text.endswith("…\n\nBody text.")


def test_max_chars_has_a_floor() -> None:
    with pytest.raises(ValueError, match="max_chars"):
        chunk_markdown("text", "a.md", max_chars=39)


def test_ids_are_stable_per_source_and_position() -> None:
    first = chunk_markdown(DOC, "rooms.md")
    assert [c.id for c in chunk_markdown(DOC, "rooms.md")] == [c.id for c in first]
    assert [c.id for c in first] == [hashlib.sha256(f"rooms.md\0{i}".encode()).hexdigest()[:32] for i in range(4)]
    assert len({c.id for c in first}) == len(first)
    # Another file gets other ids; editing a chunk's words keeps its id (its text is what changes).
    assert not {c.id for c in chunk_markdown(DOC, "other.md")} & {c.id for c in first}
    edited = chunk_markdown(DOC.replace("Two ceiling lights.", "Three ceiling lights."), "rooms.md")
    assert [c.id for c in edited] == [c.id for c in first]
    assert edited[3].text != first[3].text


def test_content_hash_follows_text_and_embedder() -> None:
    chunks = chunk_markdown(DOC, "rooms.md")
    same = content_hash(chunk_markdown(DOC, "rooms.md"), "m1")
    assert content_hash(chunks, "m1") == same
    assert content_hash(chunks, "m2") != same
    assert content_hash(chunk_markdown(DOC + "\nMore.\n", "rooms.md"), "m1") != same


def test_load_folder_reads_markdown_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# B\n\nbee\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("ay\n")
    (tmp_path / "notes.txt").write_text("not markdown")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.md").write_text("hidden")
    (tmp_path / ".draft.md").write_text("draft")
    chunks = load_folder(tmp_path)
    assert [(c.source, c.title) for c in chunks] == [("b.md", "B"), ("sub/a.md", "a")]


def test_load_folder_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(RetrievalUnavailable, match="does not exist"):
        load_folder(tmp_path / "missing")
    with pytest.raises(RetrievalUnavailable, match=r"no \*\.md files"):
        load_folder(tmp_path)
    (tmp_path / "empty.md").write_text("\n# Heading only\n")
    with pytest.raises(RetrievalUnavailable, match="have no text"):
        load_folder(tmp_path)
    (tmp_path / "bad.md").write_bytes(b"\xff\xfe not utf-8 \x80")
    with pytest.raises(RetrievalUnavailable, match="cannot read"):
        load_folder(tmp_path)


def test_the_shipped_knowledge_base_chunks_cleanly() -> None:
    chunks = load_folder(KNOWLEDGE)
    files = {p.name for p in KNOWLEDGE.glob("*.md")}
    assert 8 <= len(files) <= 15
    assert {c.source for c in chunks} == files
    assert all(len(c.text) <= 800 for c in chunks)
    assert len({c.id for c in chunks}) == len(chunks)


def test_constructor_refuses_contradictory_settings() -> None:
    with pytest.raises(ValueError, match="not both"):
        KnowledgeBase("kb", never_embed, path="/tmp/x", url="http://localhost:6333")
    with pytest.raises(ValueError, match="api_key"):
        KnowledgeBase("kb", never_embed, api_key="secret")
    with pytest.raises(ValueError, match="collection name"):
        KnowledgeBase("../kb", never_embed)
