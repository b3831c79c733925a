# hrad serve in a container (CPU). Not built or run in hrad's CI: the development machines
# have no container runtime. Build and run:
#
#   docker build -t hrad .
#   docker run --rm -p 8000:8000 -v /path/to/model:/model:ro -e HRAD_WORKERS=2 hrad
#
# Liveness probe: GET /health; readiness probe: GET /ready (503 while the queue is full);
# Prometheus scrape: GET /metrics (per worker process when HRAD_WORKERS > 1).
#
# Stopping: docker stop sends SIGTERM and, 10 s later by default, SIGKILL, which would end hrad
# serve (default --graceful-timeout 30 s) without its last line and exit status. So here the
# graceful shutdown waits HRAD_GRACEFUL_TIMEOUT=8 s for the requests in flight, then stops with
# status 143; to wait longer, raise both: -e HRAD_GRACEFUL_TIMEOUT=60 with docker run
# --stop-timeout 65 (or docker stop -t 65).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# OpenCV's runtime libraries
RUN apt-get update && apt-get install -y --no-install-recommends libglib2.0-0 libgl1 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY hrad ./hrad
# the CPU build of torch first, so pip does not pull the multi-GB CUDA one
RUN pip install "torch>=2.6,<2.14" --index-url https://download.pytorch.org/whl/cpu \
    && pip install ".[serve,export,openvino]"

RUN useradd --create-home --uid 10001 hrad
USER hrad
ENV HRAD_WORKERS=1 HRAD_GRACEFUL_TIMEOUT=8
EXPOSE 8000
CMD ["sh", "-c", "exec hrad serve --model /model --host 0.0.0.0 --port 8000 --workers ${HRAD_WORKERS} --graceful-timeout ${HRAD_GRACEFUL_TIMEOUT}"]
