# jumplora-server image. CPU by default:
#   docker build -t jumplora-server .
# CUDA: PyPI's torch wheel for Linux is the CUDA build and carries its CUDA libraries, so an empty TORCH_INDEX
# is enough on a host with the NVIDIA container runtime; a CUDA base image can be chosen too (it must provide
# python3.11 with venv, and make):
#   docker build -t jumplora-server:cuda --build-arg TORCH_INDEX= --build-arg BASE_IMAGE=<cuda image> .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# make for the install; gcc (with libc headers) builds the CPU sparse-delta kernel at the server's first start
# (server/sparse_kernel.py; without it the server still runs, on torch's slower sparse products).
RUN missing=""; for tool in make gcc; do command -v $tool >/dev/null || missing="$missing $tool"; done; \
    if [ -n "$missing" ]; then apt-get update && apt-get install -y --no-install-recommends make gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; fi \
 && useradd --create-home --uid 10001 jumplora

WORKDIR /app
COPY --chown=jumplora:jumplora pyproject.toml Makefile README.md ./
COPY --chown=jumplora:jumplora server ./server
COPY --chown=jumplora:jumplora adapters_store ./adapters_store
COPY --chown=jumplora:jumplora client ./client
COPY --chown=jumplora:jumplora benchmarks ./benchmarks
USER jumplora

# The README's install command; then the default model is converted once, into the image.
RUN make setup PYTHON=python3 TORCH_INDEX=${TORCH_INDEX} \
 && .venv/bin/python -c "from server.model import convert_default_model; convert_default_model('/app/model-cache')"

# Settings are environment variables (see README, Configuration); the store and cache live on volumes.
# The server binds every interface here, so it starts only with an admin key (learning, deleting, export):
#   docker run -p 8000:8000 -e JUMPLORA_ADMIN_KEY=<key> [-e JUMPLORA_API_KEY=<read key>] jumplora-server
# (JUMPLORA_INSECURE=true starts it without one, every admin route open to whoever reaches the port.)
ENV JUMPLORA_HOST=0.0.0.0 \
    JUMPLORA_PORT=8000 \
    JUMPLORA_MODEL=/app/model-cache/models/SmolLM2-135M-Instruct \
    JUMPLORA_STORE=/data/store \
    JUMPLORA_CACHE_DIR=/data/cache \
    PATH=/app/.venv/bin:$PATH
USER root
RUN mkdir -p /data/store /data/cache && chown -R jumplora:jumplora /data
USER jumplora
VOLUME ["/data/store", "/data/cache"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('JUMPLORA_PORT', '8000'), timeout=4)"

CMD ["jumplora", "serve"]
