# syntax=docker/dockerfile:1
# eval: scores a checkpoint in-process with transformers on one GPU (letter scoring over a shared video
# prefix) and OpenAI-compatible endpoints (openai client). Same stack as train, plus the openai client.
#
#   docker build -f images/eval.Dockerfile -t ghcr.io/trafficvlm/eval:0.1.0 .
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc + libc6-dev: torch.compile's Triton builds its small CUDA launcher modules with the system C compiler
# at the first compile (the compiled vision blocks and text step); without one, the first CUDA step fails.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group trafficvlm

WORKDIR /opt/trafficvlm
COPY pyproject.toml README.md ./
COPY components components
COPY pipelines pipelines
RUN pip install . openai==3.57.0

USER 1000:1000
ENV HOME=/home/trafficvlm
