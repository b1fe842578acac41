# The image every SafeAlign Kubernetes Job runs (charts/*: image.repository). GPU build:
#   docker build -t ghcr.io/safealign/safealign:0.1.0 .
# One consistent set (docs/install.md): vLLM 0.29.0 pins torch 2.13.0, whose PyPI wheels are CUDA 13 builds,
# so the base is CUDA 13 and the nodes need NVIDIA driver >= 580. A runtime base, no nvcc: DeepSpeed's
# JIT-built FusedAdam/CPUAdam are replaced by torch's fused AdamW (safealign.openrlhf.patches; docs/install.md
# says why not a -devel base). flash-attn is not installed (only an sdist exists, and none builds against
# torch 2.13 / CUDA 13): PyTorch's SDPA runs FlashAttention kernels on the GPU, and
# model.attn_implementation: auto picks it.
ARG BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc, libc6-dev and python3.12-dev: Triton (vLLM's kernels, torch.compile) compiles a C launcher against
# Python.h when an engine starts. Nothing else is compiled.
RUN apt-get update && \
    apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc libc6-dev git && \
    rm -rf /var/lib/apt/lists/* && python3.12 -m venv /opt/venv

# Non-root, as the charts' securityContext requires (runAsUser/fsGroup 1000): the base's uid 1000 ("ubuntu"
# on CUDA's Ubuntu 24.04 images) becomes safealign. /runs and /models are volumes.
COPY docker/ensure-user.sh docker/check-image.sh /usr/local/bin/
RUN ensure-user.sh && mkdir -p /runs /models && chown 1000:1000 /runs /models

WORKDIR /opt/safealign
# Wheels only (CI resolves requirements/gpu.txt that way for this platform), then OpenRLHF without its
# flash-attn pin. Layered before our code so a code change rebuilds nothing here.
COPY requirements ./requirements
RUN pip install -r requirements/gpu.txt && pip install --no-deps -r requirements/gpu-no-deps.txt

COPY setup.cfg pyproject.toml README.md ./
COPY plugin ./plugin
COPY charts ./charts
COPY recipes ./recipes
# Recipes mounted at /recipe/recipe.yaml name their data as ../data/...: the bundled data sits at /data.
COPY data /data
RUN ln -s /data ./data && pip install -e ".[k8s]" && check-image.sh

USER 1000
ENV SAFEALIGN_CACHE=/models/safealign HF_HOME=/models/huggingface
WORKDIR /runs
ENTRYPOINT []
CMD ["safealign", "--help"]
