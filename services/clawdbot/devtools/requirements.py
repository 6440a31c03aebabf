"""The pinned requirements of pyproject.toml, as pip reads them, for the images.

    python services/clawdbot/devtools/requirements.py [EXTRA ...]        base + extras
    python services/clawdbot/devtools/requirements.py --only NAME [EXTRA ...]

The Dockerfile runs this file by its path in a build stage that has nothing installed
yet, so it uses the standard library only. The images install exactly the pins of
pyproject.toml, and the lite image's size estimate (devtools/image_size.py) installs the
same list.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503's normalized name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match[1])


def requirements(extras: tuple[str, ...] = (), pyproject: Path = PYPROJECT) -> list[str]:
    """Base dependencies, then each extra's, without repeating a package."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise KeyError(f"{pyproject} has no extra {unknown}; it has {sorted(optional)}")
    chosen: list[str] = []
    seen: set[str] = set()
    for requirement in [*project["dependencies"], *(r for extra in extras for r in optional[extra])]:
        name = requirement_name(requirement)
        if name not in seen:
            seen.add(name)
            chosen.append(requirement)
    return chosen


def pinned(name: str, extras: tuple[str, ...] = (), pyproject: Path = PYPROJECT) -> str:
    """`name==version` of one package, without its extras (what `pip wheel` builds)."""
    for requirement in requirements(extras, pyproject):
        if requirement_name(requirement) == canonical(name):
            version = re.search(r"==\s*([^\s;,]+)", requirement)
            if version is None:
                raise ValueError(f"{requirement!r} is not pinned")
            return f"{name}=={version[1]}"
    raise KeyError(f"{name} is not among the requirements of {list(extras) or 'the base'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="requirements.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("extras", nargs="*", help="optional-dependencies groups to add")
    parser.add_argument("--only", metavar="NAME", help="print just this package's pin")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    extras = tuple(args.extras)
    try:
        lines = [pinned(args.only, extras, args.pyproject)] if args.only else requirements(extras, args.pyproject)
    except (KeyError, ValueError) as exc:
        print(f"requirements.py: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
