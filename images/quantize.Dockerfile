# syntax=docker/dockerfile:1
# quantize: FP8 post-training quantization with llm-compressor (data-free FP8_DYNAMIC; vision tower and
# lm_head kept in bf16), then the accuracy gate (re-scores the FP8 model). One GPU.
#
#   docker build -f images/quantize.Dockerfile -t ghcr.io/trafficvlm/quantize:0.1.0 .
#
# llmcompressor pins transformers <= 5.17 and compressed-tensors 0.19, which the project's pins satisfy.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc + libc6-dev: torch.compile's Triton builds its small CUDA launcher modules with the system C compiler
# at the first compile (the gate's evaluations (compiled vision blocks and text step)); without one, the first CUDA step fails.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group trafficvlm

WORKDIR /opt/trafficvlm
COPY pyproject.toml README.md ./
COPY components components
COPY pipelines pipelines
RUN pip install .

USER 1000:1000
ENV HOME=/home/trafficvlm
