# syntax=docker/dockerfile:1
# cosmos-rl: the OPTIONAL SFT engine that reproduces the reference recipe (cosmos-rl + FSDP). It needs
# transformers < 5, flash-attn and redis, so it cannot share the project's pins: it gets its own image,
# NVIDIA's PyTorch container (CUDA toolkit, torch and flash-attn built together), and the trafficvlm package
# with --no-deps for data preparation and the bundle export only (plus the light pins it imports).
#
#   docker build -f images/cosmos-rl.Dockerfile -t ghcr.io/trafficvlm/cosmos-rl:0.1.0 .
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# cosmos-rl's controller keeps its state in redis.
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && (id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 --user-group trafficvlm)

WORKDIR /opt/trafficvlm
RUN pip install cosmos-rl==0.4.7 qwen-vl-utils==0.0.14 \
      kfp==2.17.3 boto3==1.44.8 mlflow==3.17.2 PyYAML==6.0.4 tqdm==4.70.1 av==18.1.0

COPY pyproject.toml README.md ./
COPY components components
COPY pipelines pipelines
RUN pip install --no-deps .

USER 1000:1000
