# syntax=docker/dockerfile:1
# LiveLens on an NVIDIA GPU: `livelens serve`, installed with the Makefile's own `make venv`.
# Build and run through docker-compose.yml; docs/deploy.md explains ports, volumes and tokens.

# torch==2.13.0's Linux x86_64 wheel on PyPI is the CUDA 13.0 build and brings its own CUDA
# libraries (cuda-toolkit 13.0.3, cuDNN 9), so the `base` image suffices. Its CUDA version is
# what the NVIDIA Container Toolkit checks against the host driver (>= 580), so a driver that is
# too old is refused at start with a clear message instead of failing inside torch. Change both
# together.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH=torch==2.13.0

# make + python3-venv: what the Makefile's `venv` target needs. gcc + python3-dev: Triton
# compiles its kernel launchers with the system C compiler against Python.h at run time.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates make python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/livelens
COPY . .
# The README's install, verbatim: `make venv` creates .venv and pip-installs torch, then the
# project (editable, as on a dev machine). The pip cache mount only speeds up rebuilds.
RUN --mount=type=cache,target=/root/.cache/pip make venv TORCH="${TORCH}"

# Everything downloaded or built at run time goes under the /cache volume: Hugging Face
# checkpoints, the converted VideoLLaMA3 weights, Triton's compiled kernels.
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin livelens \
    && mkdir -p /cache/huggingface /cache/livelens /cache/triton \
    && chown -R livelens:livelens /cache
ENV PATH=/opt/livelens/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    LIVELENS_CACHE=/cache/livelens \
    TRITON_CACHE_DIR=/cache/triton
VOLUME /cache
USER livelens

# TCP 8000: HTTP, WHIP signalling, websockets. WebRTC media also needs UDP on ports the OS picks
# per publication, which EXPOSE cannot name: run with host networking (docs/deploy.md).
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=5)"]
ENTRYPOINT ["/opt/livelens/.venv/bin/livelens"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--redis-url", "none"]
