# icaserve: the API server with the shipped model store.
#   docker build -t icaserve .                      CPU image (default)
#   docker build -t icaserve --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#                                                   CUDA image (for the GPU reservation in docker-compose.yml)
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# torch first and pinned, from the wheel index of the chosen device: an unpinned torch from PyPI
# pulls gigabytes of CUDA packages. Its own layer, so code changes do not reinstall it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# A C compiler for the two small kernels (icaserve/native.py: ICA's hop sum, the JSON API's tensor
# scanner), built on first use for the CPU they run on; without one, the stock paths run (slower).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md ./
COPY icaserve/ icaserve/
COPY service/ service/
COPY training/ training/
COPY attribution/ attribution/
COPY model_store/ model_store/
RUN pip install . && useradd --create-home --uid 10001 icaserve && chown -R icaserve /app/model_store

# The store is read from /app/model_store (the shipped model; docker-compose.yml mounts a volume
# there). Settings are ICASERVE_* variables (README); logs are JSON lines with request ids.
ENV ICASERVE_STORE=/app/model_store \
    ICASERVE_HOST=0.0.0.0 \
    ICASERVE_PORT=8000 \
    ICASERVE_LOG_JSON=true

USER icaserve
# HTTP (JSON API, V2 REST, KServe V1, /metrics, /viewer) and V2 over gRPC
EXPOSE 8000 8081

# Ready = the default model is loaded and warmed up (python: the slim image has no curl).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]

CMD ["icaserve", "serve", "--host", "0.0.0.0"]
