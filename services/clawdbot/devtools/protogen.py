"""Generate the Python stubs and Envoy's descriptor set from protos/.

`python -m clawdbot.devtools.protogen` writes them into the tree (`make proto`);
`--check` regenerates into a temporary directory and exits 1 when the checked-in files
differ, which is how the stale-stub test works.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "protos"
GEN_DIR = REPO_ROOT / "services" / "clawdbot" / "gen" / "v1"
DESCRIPTOR = REPO_ROOT / "envoy" / "clawdbot.pb"

# protoc names imports after the proto package (clawdbot.v1), which would collide with
# the clawdbot Python package; the stubs live in clawdbot.gen.v1 instead.
_IMPORT_RE = re.compile(r"^from clawdbot\.v1 import ", re.MULTILINE)


def _include_dirs() -> list[str]:
    grpc_tools_protos = resources.files("grpc_tools") / "_proto"
    # googleapis-common-protos ships google/api/*.proto beside its generated modules.
    import google.api.annotations_pb2 as annotations

    googleapis_root = Path(annotations.__file__).resolve().parents[2]
    return [str(PROTO_ROOT), str(grpc_tools_protos), str(googleapis_root)]


def generate(out_root: Path) -> tuple[Path, Path]:
    """Run protoc into out_root; return (stub dir, descriptor path)."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    descriptor = out_root / "clawdbot.pb"
    args = ["grpc_tools.protoc"]
    args += [f"-I{d}" for d in _include_dirs()]
    args += [
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--descriptor_set_out={descriptor}",
        "--include_imports",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    stub_dir = out_root / "clawdbot" / "v1"
    for path in stub_dir.iterdir():
        if path.suffix in (".py", ".pyi"):
            path.write_text(_IMPORT_RE.sub("from clawdbot.gen.v1 import ", path.read_text()))
    (stub_dir / "__init__.py").write_text("")
    return stub_dir, descriptor


def _differences(stub_dir: Path, descriptor: Path) -> list[str]:
    diffs: list[str] = []
    fresh = {p.name for p in stub_dir.iterdir() if p.is_file()}
    current = {p.name for p in GEN_DIR.iterdir() if p.is_file()} if GEN_DIR.exists() else set()
    diffs += [f"missing {GEN_DIR / n}" for n in sorted(fresh - current)]
    diffs += [f"extra {GEN_DIR / n}" for n in sorted(current - fresh)]
    for name in sorted(fresh & current):
        if not filecmp.cmp(stub_dir / name, GEN_DIR / name, shallow=False):
            diffs.append(f"stale {GEN_DIR / name}")
    if not DESCRIPTOR.exists() or not filecmp.cmp(descriptor, DESCRIPTOR, shallow=False):
        diffs.append(f"stale {DESCRIPTOR}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when checked-in output is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stub_dir, descriptor = generate(Path(tmp))
        if args.check:
            diffs = _differences(stub_dir, descriptor)
            for line in diffs:
                print(line, file=sys.stderr)
            if diffs:
                print("generated code is stale: run `make proto`", file=sys.stderr)
            return 1 if diffs else 0
        GEN_DIR.mkdir(parents=True, exist_ok=True)
        for old in GEN_DIR.iterdir():
            if old.is_file():
                old.unlink()
        for path in stub_dir.iterdir():
            if path.is_file():
                shutil.copy2(path, GEN_DIR / path.name)
        shutil.copy2(descriptor, DESCRIPTOR)
    print(f"wrote {GEN_DIR} and {DESCRIPTOR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
