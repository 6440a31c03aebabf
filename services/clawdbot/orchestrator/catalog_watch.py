"""Workflow definitions reloaded by double buffer: when a file in the workflows folder
changes, the whole folder is read and checked beside the live catalog, then swapped in with
one assignment. A run keeps the definition it started with.

A workflow whose file turns bad keeps serving its last good version (and the problem is
listed); a workflow whose file is deleted, or that an edit removes, goes away.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from clawdbot.orchestrator.definitions import Catalog, load_catalog

log = logging.getLogger(__name__)

PATTERNS = ("*.yaml", "*.yml", "*.bpmn")
# How long changed files must stay unchanged before they are read (an editor or a copy
# may be halfway through writing them).
_SETTLE_S = 0.3


def folder_state(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What tells a changed folder: each definition file's name, mtime and size."""
    state = []
    for pattern in PATTERNS:
        for path in folder.glob(pattern):
            try:
                stat = path.stat()
            except OSError:
                continue  # deleted while listing: the next look sees it gone
            state.append((path.name, stat.st_mtime_ns, stat.st_size))
    return tuple(sorted(state))


def merge(previous: Catalog, fresh: Catalog, folder: Path) -> Catalog:
    """fresh, plus the previous version of each workflow whose file still exists but now
    has problems and no longer defines it."""
    troubled = {problem.split(":", 1)[0] for problem in fresh.problems}
    for name, workflow in previous.workflows.items():
        if name in fresh.workflows or workflow.source not in troubled or not (folder / workflow.source).exists():
            continue
        fresh.workflows[name] = workflow
        fresh.problems.append(f"{workflow.source}: workflow `{name}`: still serving its previous version")
    return fresh


class CatalogWatch:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen = folder_state(folder)
        self.catalog = load_catalog(folder)
        self.version = 1
        self._report()

    def _report(self) -> None:
        for problem in self.catalog.problems:
            log.error("workflow refused", extra={"problem": problem})
        log.info(
            "workflows loaded",
            extra={"version": self.version, "workflows": sorted(self.catalog.workflows), "folder": str(self.folder)},
        )

    async def reload(self) -> Catalog:
        self._seen = folder_state(self.folder)
        # Parsing BPMN and YAML is blocking work: off the loop that serves runs.
        fresh = await asyncio.to_thread(load_catalog, self.folder)
        self.catalog = merge(self.catalog, fresh, self.folder)
        self.version += 1
        self._report()
        return self.catalog

    async def watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            changed = folder_state(self.folder)
            if changed == self._seen:
                continue
            await asyncio.sleep(_SETTLE_S)
            if folder_state(self.folder) != changed:
                continue
            await self.reload()
