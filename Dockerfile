# streamrec worker image. Build: docker compose build (see docker-compose.yml).
#
# Two stages: hnswlib ships only as a source distribution, so the compiler lives in the build
# stage and the runtime image gets the finished virtual environment.
FROM python:3.11-slim AS build

# HNSWLIB_NO_NATIVE: hnswlib's build adds -march=native otherwise, and an image built on a
# machine with AVX-512 stops with SIGILL at its first import on one without (a restart loop)
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HNSWLIB_NO_NATIVE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# CPU torch first, in its own layer: it is the largest download and changes least.
# constraints.txt pins torch==2.13.0; the CPU index serves 2.13.0+cpu, which satisfies the pin
# and sorts above PyPI's CUDA build, so no multi-GB CUDA wheels are pulled.
COPY constraints.txt ./
RUN pip install -c constraints.txt \
        --extra-index-url https://download.pytorch.org/whl/cpu torch

# README.md (the package's long description) is left out: the image does not need it.
COPY pyproject.toml ./
COPY stream_app ./stream_app
COPY models ./models
COPY state ./state
COPY index_sync ./index_sync
COPY evaluation ./evaluation
RUN pip install -c constraints.txt \
        --extra-index-url https://download.pytorch.org/whl/cpu .

FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    STREAMREC_DATA_DIR=/data STREAMREC_METRICS_HOST=0.0.0.0
COPY --from=build /opt/venv /opt/venv
# /data exists in the image, owned by the service user, so a fresh named volume mounted there
# inherits that owner; the worker never runs as root.
RUN useradd --system --uid 10001 --home-dir /data --create-home streamrec
USER streamrec
WORKDIR /data
EXPOSE 9464
CMD ["streamrec", "worker"]
