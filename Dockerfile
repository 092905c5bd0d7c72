# labelserve: the inference server in a container (README, "Docker").
#
#   docker build -t labelserve:gpu .                          # CUDA runtime base, torch's CUDA wheel
#   docker build -t labelserve:cpu --build-arg DEVICE=cpu .   # python:3.11-slim, torch's CPU wheel
#   docker build --build-arg FETCH_WEIGHTS="mobile_sam yolo11n" ...   # checkpoints baked in (sha256-checked)
#
# Weights are mounted at /weights or fetched at build time; state lives in /data. No secret is baked in:
# credentials come at run time from the environment or from NAME_FILE secret files (see the entrypoint).
ARG DEVICE=gpu
# The CUDA base only has to match the host's driver; torch's wheel brings its own CUDA and cuDNN libraries.
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
ARG PYTHON_BASE=python:3.11-slim-bookworm

# ---- one runtime base per device: Python 3.11 and the system libraries OpenCV loads ----------------------
FROM ${CUDA_BASE} AS base-gpu
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgl1 libglib2.0-0 \
        libjemalloc2 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python

FROM ${PYTHON_BASE} AS base-cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*

# A stage, not an image (hadolint cannot tell, hence the pragma).
# hadolint ignore=DL3006
FROM base-${DEVICE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# ---- build: a virtual environment with torch first (as the Makefile does), then the project -------------
FROM base AS build
ARG DEVICE
# Keep in step with pyproject.toml (tests/test_packaging.py checks it).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# The CPU wheel skips the 3 GB of CUDA libraries; its version (2.14.1+cpu) still satisfies the project's pin.
# hadolint ignore=DL3013
RUN if [ "$DEVICE" = cpu ]; then set -- --index-url "$TORCH_CPU_INDEX"; fi \
    && pip install "$@" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY models ./models
COPY weights ./weights
# Every direct dependency is pinned in pyproject.toml; the cvat extra lets jobs upload into CVAT tasks.
# EXTRAS=cvat,ray: the image KubeRay runs (deploy/kuberay/, docs/scale-out.md).
ARG EXTRAS=cvat
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]"

# ---- optional checkpoints, fetched and sha256-verified by `labelserve weights fetch` -----------------------
FROM build AS weights
ARG FETCH_WEIGHTS=""
RUN set -e; mkdir -p /weights; for name in $FETCH_WEIGHTS; do labelserve weights fetch "$name" --dir /weights; done

# ---- runtime: the venv, the checkpoints, a non-root user ---------------------------------------------------
FROM base AS runtime
ARG UID=10001
ARG GID=10001
RUN groupadd --gid "$GID" labelserve \
    && useradd --no-log-init --uid "$UID" --gid "$GID" --create-home --home-dir /home/labelserve \
        --shell /usr/sbin/nologin labelserve \
    && mkdir -p /weights /data \
    && chown "$UID:$GID" /weights /data
COPY --from=build /opt/venv /opt/venv
COPY --from=weights --chown=${UID}:${GID} /weights /weights
RUN ln -s /opt/venv/bin/labelserve-entrypoint /usr/local/bin/labelserve-entrypoint
ENV LABELSERVE_HOST=0.0.0.0 \
    LABELSERVE_PORT=8080 \
    LABELSERVE_WEIGHTS_DIR=/weights \
    LABELSERVE_DATA_DIR=/data
WORKDIR /home/labelserve
USER ${UID}:${GID}
VOLUME ["/weights", "/data"]
EXPOSE 8080
# /healthz answers once the server is up; models may still be loading then (/readyz says when they are done).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["labelserve-entrypoint", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/labelserve-entrypoint"]
CMD []
