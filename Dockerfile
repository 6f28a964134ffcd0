# syntax=docker/dockerfile:1
# metergate: the sidecar metering proxy (roles sidecar | control | all), as a slim, non-root image.
#
#   docker build -t metergate .
#   docker run --rm -p 8080:8080 -e OPENAI_API_KEY -e METERGATE_HOST=0.0.0.0 \
#     -v "$PWD/metergate.yaml:/etc/metergate/metergate.yaml:ro" -v metergate-data:/var/lib/metergate \
#     metergate --config /etc/metergate/metergate.yaml --role all
#
# (METERGATE_HOST: a settings file's host: wins over the image's default 0.0.0.0, and 127.0.0.1 in a container
# cannot be reached through -p.)
#
# Dependencies are installed from uv.lock (hashes checked, nothing resolved at build time), and the tiktoken
# encodings are unpacked at build time, so the image never downloads anything at run time.
# tests/deploy/test_dockerfile.py lints this file and replays its install steps in a fresh environment.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
# PIP_BREAK_SYSTEM_PACKAGES: a Debian base's Python is "externally managed" (PEP 668) and its pip would refuse
# to install uv into it; the official python images ignore the variable. Only uv is installed this way, in the
# build stage, which is thrown away.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/metergate/venv
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
# Dependencies first, so that a change to the code alone reuses this layer.
COPY pyproject.toml uv.lock ./
# The Python client is a workspace member the server depends on (the admin commands use it): small, and it
# changes rarely, so it belongs with the dependencies.
COPY clients/python ./clients/python
# The otel extra (OpenTelemetry's SDK and OTLP/HTTP exporter, about 9 MB) is in, so that setting OTEL_* variables
# in the container is enough to export traces; off, metergate never imports it. Both syncs name it: a sync
# removes what it is not asked for.
RUN uv sync --frozen --no-dev --no-editable --extra otel --no-install-project
COPY README.md ./
COPY metergate ./metergate
RUN uv sync --frozen --no-dev --no-editable --extra otel \
 && /opt/metergate/venv/bin/python -c "from pathlib import Path; from metergate.metering.tokenizer import seed_cache; seed_cache(Path('/opt/metergate/tiktoken'))"

# -------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
# jemalloc, preloaded below: the sidecar's memory. Its size classes fit tiktoken's 200,000 small token strings
# far tighter than glibc's 32-byte minimum chunk (o200k_base about 30 MiB of RSS instead of 41), and a
# background thread hands freed pages back within a second. The distribution's package, like the base image's
# own libraries: not pinned to a version the next base image may not carry.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 metergate \
 && useradd --system --uid 10001 --gid metergate --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin metergate \
 && mkdir -p /var/lib/metergate /etc/metergate \
 && chown metergate:metergate /var/lib/metergate
COPY --from=build /opt/metergate /opt/metergate
# LD_PRELOAD names the library, not a path, so that the loader finds it on any architecture. MALLOC_CONF:
# two arenas (jemalloc would make four per CPU of the node, not of the pod's limit), freed pages returned by a
# background thread after a second (dirty_decay_ms) and not kept as "muzzy" (README.md, "Memory").
# TIKTOKEN_CACHE_DIR names a directory of public tokenizer data: not the secret that DL3064 suspects.
# hadolint ignore=DL3064
ENV PATH=/opt/metergate/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TIKTOKEN_CACHE_DIR=/opt/metergate/tiktoken \
    LD_PRELOAD=libjemalloc.so.2 \
    MALLOC_CONF=narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0
# The embedded default database (sqlite:///metergate.db) lands in the working directory, a volume in practice.
WORKDIR /var/lib/metergate
USER 10001:10001
EXPOSE 8080
# The health check asks /livez on the port serve's own settings give (file, METERGATE_* variables, defaults),
# read from PID 1's command line: a port set in the settings file is followed. No curl in a slim image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
  CMD ["metergate", "health"]
# The image listens on all addresses by default; a settings file's host: or METERGATE_HOST still wins.
ENTRYPOINT ["metergate", "serve", "--default", "host=0.0.0.0"]
