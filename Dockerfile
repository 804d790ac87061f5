# One image for both Mailplane processes:
#   operator:  mailplane operator [--all-namespaces | --namespace NS ...]
#   relay:     mailplane relay --config /etc/mailplane/config   (the operator's StatefulSets)
#   portal:    mailplane portal --store @/etc/mailplane/store/dsn  (the chart's portal.enabled)
#
# Build:  docker build -t ghcr.io/mailplane/mailplane:0.1.0 .
# The base is pinned to an exact patch release; release builds pin the digest as well
# (docker buildx imagetools inspect python:3.11.11-slim-bookworm) by passing
# --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:<digest>.
# Every dependency ships binary wheels for linux/amd64 and linux/arm64 (cryptography,
# pydantic-core, uvloop, aiohttp), so neither stage needs a compiler.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- builder: the mailplane wheel, installed with its dependencies into a venv ------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, from the hash-pinned lock (scripts/lock): the same versions as CI tests,
# and a download that does not match its hash fails the build. This layer is cached until a
# lock file changes.
COPY requirements/runtime.lock requirements/build.lock ./requirements/
RUN pip install --require-hashes -r requirements/build.lock \
 && python -m venv --without-pip /opt/mailplane \
 && pip --python /opt/mailplane/bin/python install --require-hashes -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY operator ./operator
COPY cli ./cli
COPY portal ./portal
# The package itself, with nothing resolved or fetched: every dependency is already installed.
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && pip --python /opt/mailplane/bin/python install --no-deps /wheels/mailplane-*.whl \
 && /opt/mailplane/bin/python -m compileall -q /opt/mailplane/lib

# ---- runtime: the venv on a clean base, no pip in the venv, no build tools ----------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mailplane" \
      org.opencontainers.image.description="Mailplane operator and SMTP relay" \
      org.opencontainers.image.source="https://github.com/mailplane/mailplane" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/mailplane /opt/mailplane
# Bytecode is compiled at build time: the pods run with a read-only root filesystem.
ENV PATH=/opt/mailplane/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# 65532 is the conventional "nonroot" UID (distroless); the pod securityContexts set it too.
USER 65532:65532
WORKDIR /tmp
# Relay: SMTP 1587 (STARTTLS) and 1465 (implicit TLS), unprivileged, behind a Service that
# maps 587/465; HTTP 8080 (/metrics, /livez, /readyz) for relay and operator.
EXPOSE 1587 1465 8080
ENTRYPOINT ["mailplane"]
CMD ["--help"]
