# syntax=docker/dockerfile:1
# train: the PyTorchJob's pods — `torchrun -m trafficvlm.train` with FSDP2 on GPUs, the default SFT engine.
#
#   docker build -f images/train.Dockerfile -t ghcr.io/trafficvlm/train:0.1.0 .
#
# The whole project with its pins: PyPI's torch 2.13.0 linux wheel carries its CUDA runtime (nvidia-*
# wheels), so a slim Python base is enough; the GPU driver comes from the node (NVIDIA container toolkit).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc + libc6-dev: torch.compile's Triton builds its small CUDA launcher modules with the system C compiler
# at the first compile (the frozen vision tower's compiled blocks); without one, the first CUDA step fails.
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
