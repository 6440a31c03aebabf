"""Every shell and Python example in README.md, run as written against a running mesh, so
that an example that drifts from the code fails here instead of in a newcomer's terminal.

The examples run the way a reader runs them after `make run`: from a checkout-like working
directory (`.clawdbot/api_key`, `.clawdbot/internal_token`, a `question.wav` recording,
`ca.pem` for the TLS ones), in a shell that has `$KEY` from the first example and
`$CLAWDBOT_PORT` pointing at the mesh's Envoy (the README's examples fall back to 8080
without it). Shell blocks run under `bash -euo pipefail`, Python blocks with the project's
interpreter. How each block is run, or why it is not, is decided in one place, EXAMPLES
below; a block it does not name runs against the default mesh and must exit 0 and print
something, so a new example fails until it runs or is classified there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml

from tests.conftest import Mesh, core_mesh_config, running_mesh
from tests.support import INTERNAL_TOKEN, REPO_ROOT, handmade_wav, make_pki

pytestmark = [pytest.mark.e2e, pytest.mark.local_model]

README = REPO_ROOT / "README.md"
SHELL = {"sh", "bash", "shell"}
PYTHON = {"python", "py"}

# What the smart-assistant example's question.wav says, and what a recording of it is like:
# a phone or a laptop records 44.1 kHz stereo, and ten seconds of that (1.7 MB, 2.3 MB of
# base64) is far past the 128 KiB one command-line argument may hold on Linux. A room is
# never digitally silent: seconds of exact zeros after the words throw the recogniser off
# (it hears "do you turn on"), a faint noise floor (about -50 dBFS) does not.
QUESTION = "turn on the kitchen lights"
RECORDING_RATE = 44100
RECORDING_SECONDS = 10
NOISE_FLOOR = 100  # standard deviation, in 16-bit sample units
ARGUMENT_LIMIT = 128 * 1024  # MAX_ARG_STRLEN


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the opening fence, 1-based
    text: str

    @property
    def id(self) -> str:
        """Its line and its first line that says something (imports say little)."""
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        telling = [line for line in lines if not line.startswith(("import ", "from "))]
        return f"L{self.line}:{(telling or lines or [''])[0][:50]}"


FENCE = re.compile(r"^(?P<indent> *)```(?P<language>[\w+-]*)\s*$")


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, dedented by their fence's indentation
    (blocks inside list items are indented)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent = len(opening["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        assert j < len(lines), f"README.md:{i + 1}: a code block that is never closed"
        blocks.append(Block(opening["language"].lower(), i + 1, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def runnable_blocks() -> list[Block]:
    return [b for b in readme_blocks(README.read_text()) if b.language in SHELL | PYTHON]


# --- how each example is checked: given its stdout and its working directory -------------


def prints_something(out: str, _: Path) -> None:
    assert out.strip(), "the example printed nothing"


def a_chat_completion(out: str, _: Path) -> None:
    reply = json.loads(out)
    assert reply["object"] == "chat.completion", reply
    assert reply["choices"][0]["message"]["content"].strip(), reply


def an_answer_then_a_streamed_story(out: str, _: Path) -> None:
    answer, _newline, story = out.partition("\n")
    assert answer.strip() and story.strip(), out


def services_then_a_grpc_chat_completion(out: str, _: Path) -> None:
    services = out[: out.index("{")].split()
    assert "clawdbot.v1.Gateway" in services, out
    reply = json.loads(out[out.index("{") :])
    assert reply["choices"][0]["message"]["content"].strip(), reply


def a_model_swapped_in(out: str, _: Path) -> None:
    loaded = json.loads(out)
    assert loaded["name"] == "all-minilm-l6-v2" and loaded["version"], loaded


def the_spoken_command_understood(out: str, _: Path) -> None:
    # The README's comment says what it prints: "turn on the kitchen lights -> lights_on".
    assert "kitchen" in out and out.strip().endswith("-> lights_on"), out


def the_assistant_answered_with_speech(out: str, _: Path) -> None:
    run = json.loads(out)
    assert run["status"] == "succeeded", {k: v for k, v in run.items() if k != "output"}
    output = run["output"]
    # Every step but the retrieval (on_error: continue) must have served. What the recogniser
    # makes of the words is tests/e2e/test_workflows.py's business; here, that it heard some.
    failed = [s["id"] for s in run["steps"] if s["status"] != "succeeded" and s["id"] != "knowledge"]
    assert not failed, run["steps"]
    assert output["transcript"].strip() and output["intent"] and output["answer"].strip(), output["transcript"]
    with wave.open(io.BytesIO(base64.b64decode(output["audio"]))) as answer:
        assert answer.getnframes() / answer.getframerate() > 0.3


def the_tls_mesh_model_listed(out: str, _: Path) -> None:
    assert "mock-1" in out, out


def services_and_models_over_tls(out: str, workdir: Path) -> None:
    the_tls_mesh_model_listed(out, workdir)
    assert "clawdbot.v1.Gateway\n" in out, out  # after curl's JSON, which ends without a newline


@dataclass(frozen=True)
class Run:
    check: Callable[[str, Path], None] = prints_something
    # "local": config/clawdbot.yaml, the mesh `make run` starts (local_reader); "tls": a core
    # mesh with gateway.tls on and a certificate for localhost from the test's CA (tls_reader).
    mesh: str = "local"
    # A default port written in the example -> the ready file's name for the port the test
    # mesh took instead: only for ports no environment variable sets (Envoy's has
    # CLAWDBOT_PORT), since every test mesh takes its ports from the OS.
    ports: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 240


@dataclass(frozen=True)
class Skip:
    reason: str


# Every README example the default (run on the local mesh, exit 0, print something) does not
# fit, found by a piece of its text that picks out exactly that one block.
EXAMPLES: dict[str, Run | Skip] = {
    "make run": Skip(
        "`make run` runs the mesh in the foreground until Ctrl-C and `make test` runs the whole "
        "suite, this test included: the test starts the same runner on the same configuration"
    ),
    "/v1/chat/completions": Run(a_chat_completion),
    'content": "Once upon a time"': Run(an_answer_then_a_streamed_story),
    "clawdbot.v1.Gateway/CreateChatCompletion": Run(services_then_a_grpc_chat_completion),
    "ModelService/LoadModel": Run(a_model_swapped_in, ports=(("127.0.0.1:7021", "worker_grpc"),)),
    'model="pocketsphinx-en"': Run(the_spoken_command_understood),
    "smart_assistant:run": Run(the_assistant_answered_with_speech),
    "curl --cacert ca.pem": Run(services_and_models_over_tls, mesh="tls"),
    "httpx2.Client(verify=": Run(the_tls_mesh_model_listed, mesh="tls"),
    "kubectl -n clawdbot create secret": Skip("needs a Kubernetes cluster"),
    "docker compose up": Skip(
        "needs a Docker engine and the images; tests/unit/test_containers.py holds "
        "docker-compose.yml and the Dockerfile to the code"
    ),
    "docker run -d": Skip("needs a Docker engine and the clawdbot:lite image (docker build --target lite)"),
}


def handling(block: Block) -> Run | Skip:
    found = [how for piece, how in EXAMPLES.items() if piece in block.text]
    assert len(found) <= 1, f"{block.id}: more than one entry of EXAMPLES picks out this block"
    return found[0] if found else Run()


# --- the meshes and the reader's working directories -----------------------------------


@dataclass(frozen=True)
class Reader:
    """Where a reader runs the examples for one mesh: the directory and the shell's environment."""

    mesh: Mesh
    workdir: Path
    env: dict[str, str]


def write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(value + "\n")


def reader_for(mesh: Mesh, workdir: Path) -> Reader:
    """A checkout-like directory holding the files the runner keeps in `.clawdbot/` (the test
    meshes keep theirs elsewhere), and a shell after the first example."""
    write_secret(workdir / ".clawdbot" / "api_key", mesh.api_key)
    write_secret(workdir / ".clawdbot" / "internal_token", INTERNAL_TOKEN)
    # The reader's environment, without what the test process itself carries for its meshes.
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLAWDBOT_")}
    # `python` is the project's, as in `make run`'s virtualenv; grpcurl is in .tools/bin.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(REPO_ROOT / ".tools" / "bin"), env["PATH"]])
    env["CLAWDBOT_PORT"] = str(urlsplit(mesh.url).port)
    env["KEY"] = mesh.api_key
    return Reader(mesh, workdir, env)


def recorded_question(workdir: Path) -> Path:
    """question.wav as a recording would be: espeak-ng's speech of the question (as README
    suggests making one), 44.1 kHz stereo, half a second in, ten seconds in all, over a
    faint noise floor (seeded: the same file every run)."""
    spoken = workdir / "spoken.wav"
    subprocess.run(["espeak-ng", "-w", str(spoken), QUESTION], check=True, timeout=60)
    with wave.open(str(spoken)) as speech:
        assert speech.getsampwidth() == 2 and speech.getnchannels() == 1
        rate = speech.getframerate()
        samples = np.frombuffer(speech.readframes(speech.getnframes()), "<i2").astype(np.float64)
    spoken.unlink()
    resampled = np.interp(
        np.arange(len(samples) * RECORDING_RATE // rate) * rate / RECORDING_RATE, np.arange(len(samples)), samples
    )
    mono = np.random.default_rng(15).normal(0, NOISE_FLOOR, RECORDING_RATE * RECORDING_SECONDS)
    start = RECORDING_RATE // 2
    mono[start : start + len(resampled)] += resampled
    stereo = np.repeat(np.clip(mono, -32768, 32767).astype("<i2"), 2)
    path = workdir / "question.wav"
    path.write_bytes(handmade_wav(stereo.tobytes(), rate=RECORDING_RATE, channels=2))
    return path


@pytest.fixture(scope="module")
def local_reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    """The mesh `make run` starts (config/clawdbot.yaml, local models and all), on ports
    from the OS, once its models serve."""
    tmp = tmp_path_factory.mktemp("readme")
    config: dict[str, Any] = yaml.safe_load((REPO_ROOT / "config" / "clawdbot.yaml").read_text())
    # The one change: a fresh object store, so that nothing an earlier run cached answers here.
    config["cache"] = {**config.get("cache", {}), "object_dir": str(tmp / "objects")}
    # No mock provider: the default configuration has local models only.
    with running_mesh(tmp, config, mock_url="") as mesh:
        mesh.wait_for_local_models()
        reader = reader_for(mesh, tmp / "checkout")
        recorded_question(reader.workdir)
        yield reader


@pytest.fixture(scope="module")
def tls_reader(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Reader]:
    """A core mesh serving TLS with a certificate for localhost; its CA is the reader's ca.pem."""
    tmp = tmp_path_factory.mktemp("readme-tls")
    pki = make_pki(tmp / "pki")
    tls_files = {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)}
    config = core_mesh_config(mock_upstream, tmp, gateway={"tls": tls_files})
    with running_mesh(tmp, config, mock_upstream) as mesh:
        reader = reader_for(mesh, tmp / "checkout")
        (reader.workdir / "ca.pem").write_bytes(pki.ca_pem)
        yield reader


# --- running an example -----------------------------------------------------------------


def run_example(block: Block, how: Run, reader: Reader, scripts: Path) -> subprocess.CompletedProcess[str]:
    text = block.text
    ports = reader.mesh.info()["ports"]
    for written, name in how.ports:
        assert written in text, f"{block.id}: EXAMPLES expects {written} in this example"
        text = text.replace(written, f"127.0.0.1:{ports[name]}")
    if block.language in PYTHON:
        script = scripts / f"readme_L{block.line}.py"
        argv = [sys.executable, str(script)]
    else:
        script = scripts / f"readme_L{block.line}.sh"
        argv = ["bash", "-euo", "pipefail", str(script)]
    script.write_text(text)
    # A session of its own, so that a timeout takes the example's children (curl, grpcurl) too.
    proc = subprocess.Popen(
        argv,
        cwd=reader.workdir,
        env=reader.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=how.timeout_s)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{block.id} did not finish within {how.timeout_s:g} s:\n{out[-2000:]}\n{err[-2000:]}"
        ) from exc
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.id)
def test_readme_example(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    how = handling(block)
    if isinstance(how, Skip):
        pytest.skip(how.reason)
    reader: Reader = request.getfixturevalue(f"{how.mesh}_reader")
    done = run_example(block, how, reader, tmp_path)
    assert done.returncode == 0, (
        f"README.md:{block.line} ({block.language}) exited {done.returncode}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )
    how.check(done.stdout, reader.workdir)


def test_every_entry_picks_out_one_example() -> None:
    """An entry whose text no longer picks out exactly one block classifies nothing (or the
    wrong block): the README changed under it."""
    blocks = runnable_blocks()
    assert blocks, "no shell or Python examples found in README.md"
    for piece in EXAMPLES:
        matching = [b.id for b in blocks if piece in b.text]
        assert len(matching) == 1, f"EXAMPLES entry {piece!r} picks out {matching or 'no block'}"


def test_examples_reach_the_gateway_through_clawdbot_port() -> None:
    """An example with a bare 8080 would reach whatever listens there on this machine (a
    developer's `make run`), never the test's mesh, and could pass for the wrong reason."""
    allowed = ("${CLAWDBOT_PORT:-8080}", "os.environ.get('CLAWDBOT_PORT', '8080')")
    for block in runnable_blocks():
        if isinstance(handling(block), Skip):
            continue
        bare = block.text
        for form in allowed:
            bare = bare.replace(form, "")
        assert "8080" not in bare, f"{block.id}: write the gateway's port as {allowed[0]} (or {allowed[1]})"


def test_the_old_smart_assistant_command_does_not_fit_a_recording(tmp_path: Path) -> None:
    """Why the README builds the body in a file: a recording's base64 as one argument is
    refused by the kernel before curl even starts (so no mesh is needed to see it)."""
    assert len(base64.b64encode(recorded_question(tmp_path).read_bytes())) > ARGUMENT_LIMIT
    old = 'curl -s http://127.0.0.1:1/ -d "{\\"input\\": {\\"audio\\": \\"$(base64 -w0 question.wav)\\"}}"'
    done = subprocess.run(["bash", "-c", old], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 126 and "Argument list too long" in done.stderr, done
