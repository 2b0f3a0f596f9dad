# syntax=docker/dockerfile:1
# base: the light pipeline stages — ingest (S3), prepare (LLaVA JSON), the SFT launcher (creates and follows
# the PyTorchJob; no GPU), promote (MLflow registry) and rollout (git, helm values). No torch, no CUDA.
#
#   docker build -f images/base.Dockerfile -t ghcr.io/trafficvlm/base:0.1.0 .
#
# The trafficvlm package goes in with --no-deps; the third-party packages these stages import are listed
# with the exact pins of pyproject.toml (tests/test_images.py checks both).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# git + ssh: the rollout stage clones and pushes the GitOps repository.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group trafficvlm

WORKDIR /opt/trafficvlm
RUN pip install \
      kfp==2.17.3 kfp-kubernetes==2.17.3 kubernetes==30.1.0 \
      boto3==1.44.8 mlflow==3.17.2 PyYAML==6.0.4 jsonschema==4.26.0 tqdm==4.70.1 \
      av==18.1.0 numpy==2.4.6 pillow==13.0.0 httpx==0.28.1

COPY pyproject.toml README.md ./
COPY components components
COPY pipelines pipelines
RUN pip install --no-deps .

USER 1000:1000
ENV HOME=/home/trafficvlm
