"""Workflow definitions reloaded by double buffer when their folder changes."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import yaml

from clawdbot.orchestrator.catalog_watch import CatalogWatch
from tests.support import wait_for_async


def write(folder: Path, name: str, workflows: dict[str, object]) -> None:
    (folder / name).write_text(yaml.safe_dump({"workflows": workflows}))


def constant(value: object) -> dict[str, object]:
    return {"steps": [{"id": "a", "type": "transform", "params": {"value": value}}]}


@pytest.mark.asyncio
async def test_changes_are_swapped_in_and_a_broken_file_keeps_its_last_good_version(tmp_path: Path) -> None:
    write(tmp_path, "one.yaml", {"hello": constant(1)})
    watch = CatalogWatch(tmp_path)
    assert list(watch.catalog.workflows) == ["hello"] and watch.version == 1
    live = watch.catalog.workflows["hello"]
    watcher = asyncio.create_task(watch.watch(0.05))
    try:
        write(tmp_path, "two.yaml", {"added": constant(2)})

        async def reloaded(version: int) -> bool:
            return watch.version >= version

        await wait_for_async(lambda: reloaded(2), 10, "the new file to be loaded")
        assert sorted(watch.catalog.workflows) == ["added", "hello"]
        assert watch.catalog.workflows["hello"] == live  # unchanged: the same definition

        # A bad edit: `hello` keeps serving its previous version, and the problem is listed.
        write(tmp_path, "one.yaml", {"hello": {"steps": [{"id": "a", "type": "teleport"}]}})
        await wait_for_async(lambda: reloaded(3), 10, "the broken file to be read")
        assert watch.catalog.workflows["hello"] == live
        problems = "\n".join(watch.catalog.problems)
        assert "one.yaml: workflow `hello`" in problems and "still serving its previous version" in problems

        # Fixed, then deleted: the new version serves, then the workflow is gone.
        write(tmp_path, "one.yaml", {"hello": constant(3)})
        await wait_for_async(lambda: reloaded(4), 10, "the fixed file to be read")
        assert watch.catalog.workflows["hello"].steps[0].params == {"value": 3} and not watch.catalog.problems
        (tmp_path / "one.yaml").unlink()
        await wait_for_async(lambda: reloaded(5), 10, "the deletion to be seen")
        assert list(watch.catalog.workflows) == ["added"]
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
