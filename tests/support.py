"""Helpers for tests that start real processes: wait on conditions, never on sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clawdbot.common.internal_auth import TOKEN_METADATA_KEY
from clawdbot.runner.__main__ import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICES_DIR = REPO_ROOT / "services"
PACKAGE_DIR = SERVICES_DIR / "clawdbot"

T = TypeVar("T")

# The internal credential of everything the tests start: conftest puts it in os.environ at
# import, so in-process servers, internal_channel clients and the runner's meshes share it.
INTERNAL_TOKEN = "test-internal-token-0123456789abcdef"
# For a call straight to a service's port on a channel that is not an internal_channel.
INTERNAL_METADATA = ((TOKEN_METADATA_KEY, INTERNAL_TOKEN),)


class GiveUp(Exception):
    """Raised by a wait_for condition when waiting longer cannot help."""


def wait_for(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll until condition() returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except GiveUp:
            raise
        except Exception as exc:  # the condition is allowed to fail while things start
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)
    raise TimeoutError(
        f"timed out after {timeout:g} s waiting for {what}" + (f" (last error: {last_error})" if last_error else "")
    )


def python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SERVICES_DIR), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Proc:
    """A child process with its output in a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or python_env(),
            cwd=cwd or REPO_ROOT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        # Also after stop(), which closes the log: a failure report reads it then.
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode


def read_json_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def start_mock_upstream(tmp: Path, *extra: str) -> tuple[Proc, int]:
    ready = tmp / "mock.ready.json"
    proc = Proc(
        [sys.executable, "-m", "clawdbot.devtools.mock_upstream", "--port", "0", "--ready-file", str(ready), *extra],
        tmp / "mock.log",
    )

    def ready_port() -> int | None:
        if not proc.alive():
            raise GiveUp(f"mock upstream exited:\n{proc.output()}")
        info = read_json_file(ready)
        return int(info["port"]) if info else None

    return proc, wait_for(ready_port, 60, "the mock upstream")


def grpcurl(
    target: str, *args: str, data: Any = None, headers: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run grpcurl (plaintext) against target; `make setup` installs it with go install."""
    found = shutil.which("grpcurl") or str(REPO_ROOT / ".tools" / "bin" / "grpcurl")
    assert Path(found).exists(), "grpcurl missing: `make setup` installs it with go install"
    argv = [found, "-plaintext", "-max-time", "60"]
    for header in headers:
        argv += ["-H", header]
    if data is not None:
        argv += ["-d", json.dumps(data)]
    return subprocess.run([*argv, target, *args], capture_output=True, text=True, timeout=90)


def unused_port() -> int:
    """A port in the kernel's ephemeral range that nothing listens on: for an upstream that
    must be down (servers get theirs from `free_port`, below that range, so never this one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    name: str,
    tmp: Path,
    argv_for: Callable[[int], list[str]],
    answers: Callable[[int], bool],
    port: int | None = None,
    within_s: float = 60,
) -> tuple[Proc, int]:
    """A server process on 127.0.0.1 (a free port, or `port`), once `answers(port)`.

    A free port can be taken by someone else before the server binds it: then another is
    tried. With a fixed `port` (a restart) it must come up there. Its log is in tmp.
    """
    for attempt in range(1 if port is not None else 3):
        chosen = port if port is not None else free_port()
        log = tmp / f"{name}-{chosen}-{len(list(tmp.glob(f'{name}-{chosen}-*.log')))}.log"
        proc = Proc(argv_for(chosen), log)

        def ready(proc: Proc = proc, chosen: int = chosen) -> bool:
            if not proc.alive():
                raise GiveUp(f"{name} exited:\n{proc.output()}")
            return answers(chosen)

        try:
            wait_for(ready, within_s, f"{name} on port {chosen}", interval=0.1)
        except GiveUp:
            proc.stop()
            if port is not None or attempt == 2:
                raise
            continue
        except BaseException:
            proc.stop()
            raise
        return proc, chosen
    raise AssertionError("unreachable")


def redis_answers(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:port answers PING (raw RESP: no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(tmp: Path, port: int | None = None) -> tuple[Proc, int]:
    """A throwaway redis-server on 127.0.0.1, without persistence, once it answers PING.

    Stop it with Proc.stop(); pass the same `port` to start it again there (its data is gone).
    """
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    assert Path(found).exists(), "redis-server missing: `make setup` installs it"

    def argv(chosen: int) -> list[str]:
        return [
            found,
            "--port",
            str(chosen),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ]

    return start_server("redis", tmp, argv, redis_answers, port, within_s=30)


async def wait_for_async(
    condition: Callable[[], Awaitable[T | None]], within_s: float, what: str, interval: float = 0.05
) -> T:
    """wait_for for async tests: polls an async condition without blocking the event loop."""
    deadline = time.monotonic() + within_s
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {within_s:g} s waiting for {what}")
        await asyncio.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def s3_answers(port: int) -> bool:
    """Whether an HTTP server on 127.0.0.1:port answers at all (any status: S3 says 403 to strangers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def start_s3_server(tmp: Path, port: int | None = None) -> tuple[Proc, int]:
    """A throwaway S3-compatible server (moto, in memory) on 127.0.0.1, once it answers HTTP.

    It takes any credentials. Stop it with Proc.stop(); pass the same `port` to start it
    again there (its buckets are gone).
    """

    def argv(chosen: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(chosen)]

    return start_server("s3", tmp, argv, s3_answers, port)


def start_kafka(tmp: Path, port: int | None = None, controller_port: int | None = None) -> tuple[Proc, int, int]:
    """A one-node Kafka broker (KRaft) on 127.0.0.1 with its data in tmp/kafka, once it
    answers metadata; returns it with its broker and controller ports.

    Stop it with Proc.stop() (SIGTERM: a clean shutdown); pass the same tmp (and ports) to
    start it again over the same data. Call it from synchronous code (a fixture): it runs
    its readiness probe with asyncio.run.
    """
    from clawdbot.common.kafka import broker_ready
    from clawdbot.runner.kafka import broker_argv, format_storage, kafka_installed

    assert kafka_installed(), "Kafka's jars missing: `make setup` installs them (deploy/kafka/kafka.sh install)"
    data_dir = tmp / "kafka"
    controller = controller_port or free_port()

    def argv(chosen: int) -> list[str]:
        nonlocal controller
        while controller == chosen:
            controller = free_port()
        format_storage(data_dir, chosen, controller)
        return broker_argv(data_dir)

    def answers(chosen: int) -> bool:
        return asyncio.run(broker_ready(f"127.0.0.1:{chosen}"))

    # A JVM start takes seconds even on an idle machine; a busy one can take a minute.
    proc, chosen = start_server("kafka", tmp, argv, answers, port, within_s=180)
    return proc, chosen, controller


def service_packages() -> dict[str, Path]:
    """Packages of services/clawdbot that are services: an entry point that serves through
    the shared entry point (common/entrypoint.py) or a server module. What the container
    and Kubernetes checks hold their manifests to."""
    found: dict[str, Path] = {}
    for package in sorted(PACKAGE_DIR.iterdir()):
        main = package / "__main__.py"
        if main.exists() and ((package / "server.py").exists() or "clawdbot.common.entrypoint" in main.read_text()):
            found[package.name] = package
    return found


async def timed(awaitable: Awaitable[T]) -> tuple[T, float]:
    """What awaitable gives, and the seconds it took."""
    started = time.perf_counter()
    result = await awaitable
    return result, time.perf_counter() - started


def handmade_wav(
    payload: bytes,
    *,
    rate: int = 16000,
    channels: int = 1,
    bits: int = 16,
    block_align: int | None = None,
    data_size: int | None = None,
    before_data: bytes = b"",
    fmt_size: int | None = None,
) -> bytes:
    """A PCM RIFF/WAVE file assembled by hand, so every header field can lie: the format's
    fields, the 'fmt ' and 'data' chunk sizes (the RIFF size follows a given data size),
    and chunks before the data."""
    align = channels * bits // 8 if block_align is None else block_align
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * align) & 0xFFFFFFFF, align & 0xFFFF, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt) if fmt_size is None else fmt_size) + fmt + before_data
    body += b"data" + struct.pack("<I", len(payload) if data_size is None else data_size) + payload
    riff_size = len(body) if data_size is None else min(data_size + 36, 0xFFFFFFFF)
    return b"RIFF" + struct.pack("<I", riff_size) + body


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    cert_file: Path
    key_file: Path

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem.decode())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(folder: Path) -> Pki:
    """A CA, and a server certificate it signs for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("clawdbot test CA"))
        .issuer_name(_name("clawdbot test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file = folder / "tls.crt"
    key_file = folder / "tls.key"
    # The chain as a Kubernetes TLS Secret holds it: leaf first, then the issuer.
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Pki(ca.public_bytes(serialization.Encoding.PEM), cert_file, key_file)


# --- PostgreSQL (the key store's tests) ----------------------------------------------


def postgres_bin(name: str) -> Path:
    """A binary of Debian's postgresql package (newest major version installed)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    assert found, "PostgreSQL missing (/usr/lib/postgresql/*/bin): `make setup` installs Debian's postgresql"
    return found[-1]


class PostgresProc(Proc):
    """A throwaway postgres: stop() asks for a fast shutdown (SIGINT: clients are cut)
    instead of SIGTERM's wait for every client, then removes its data directory."""

    def __init__(self, argv: list[str], log_path: Path, home: Path | None):
        super().__init__(argv, log_path)
        self.home = home  # removed by stop(); None: kept (for another try)

    def stop(self, timeout: float = 60.0) -> int:
        if self.alive():
            # The group: runuser and postgres under it (runuser forwards, postgres is told twice: harmless).
            os.killpg(self.popen.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        code = super().stop(timeout)
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
        return code


def start_postgres(tmp: Path, database: str = "clawdbot") -> tuple[PostgresProc, str]:
    """A throwaway PostgreSQL on 127.0.0.1 (a port from free_port) with an empty `database`,
    once it accepts connections: (process, "postgresql+asyncpg://postgres@127.0.0.1:PORT/db").

    postgres refuses to run as root: it runs as the `postgres` user (runuser) in a data
    directory of its own under /tmp (pytest's tmp dirs are private to root); its log is in
    tmp. Trust authentication, no fsync: for tests only.
    """
    assert shutil.which("runuser"), "runuser (util-linux) missing"
    home = Path(tempfile.mkdtemp(prefix="clawdbot-pg-"))
    data, sockets = home / "data", home / "sockets"
    sockets.mkdir()
    for path in (home, sockets):
        shutil.chown(path, "postgres", "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    initdb_argv = [str(postgres_bin("initdb")), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    initdb = subprocess.run(
        [*as_postgres, *initdb_argv, "--no-sync", "--no-instructions"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert initdb.returncode == 0, f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}"

    def argv(port: int) -> list[str]:
        settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "100"}
        return [
            *as_postgres,
            str(postgres_bin("postgres")),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(sockets),
            *[arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")],
        ]

    def accepts(port: int) -> bool:
        ready = subprocess.run(
            [str(postgres_bin("pg_isready")), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
            capture_output=True,
            timeout=30,
        )
        return ready.returncode == 0

    proc: PostgresProc | None = None
    for attempt in range(3):
        port = free_port()
        log = tmp / f"postgres-{port}.log"
        proc = PostgresProc(argv(port), log, home)

        def ready(proc: PostgresProc = proc, port: int = port) -> bool:
            if not proc.alive():
                raise GiveUp(f"postgres exited:\n{proc.output()}")
            return accepts(port)

        try:
            wait_for(ready, 90, f"postgres on port {port}", interval=0.1)
        except GiveUp:
            # Most likely the port was taken meanwhile: another one (the data dir stays).
            proc.home = None if attempt < 2 else home
            proc.stop()
            if attempt == 2:
                raise
            continue
        except BaseException:
            proc.stop()
            raise
        created = subprocess.run(
            [str(postgres_bin("createdb")), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            proc.stop()
            raise AssertionError(f"createdb failed:\n{created.stdout}\n{created.stderr}")
        return proc, f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"
    raise AssertionError("unreachable")
