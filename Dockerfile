# rgrl on a CUDA PyTorch image: the pinned training stack with DeepSpeed, rgrl installed, and
# `accelerate launch -m rgrl.train` as the entry point. Build from the repository root:
#   docker build -t rgrl .
# Run (arguments are rgrl.train's: the recipe, then --section.key overrides; ACCELERATE_CONFIG picks launch/*.yaml):
#   docker run --gpus all --ipc=host -v ~/.cache/huggingface:/hf-cache -v "$PWD/outputs:/workspace/rgrl/outputs" \
#     -e ACCELERATE_CONFIG=launch/zero2.yaml rgrl recipes/wildchat_dream.yaml
# launch/README.md has the Apptainer/Singularity and SLURM variants.

# A PyTorch CUDA "devel" image (nvcc, for DeepSpeed ops that compile on first use); any torch >= 2.6 works.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/hf-cache \
    RGRL_CACHE=/hf-cache/rgrl \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    ACCELERATE_CONFIG=launch/single_gpu.yaml \
    ACCELERATE_ARGS=""

# The stack rgrl is tested with, pinned; torch stays the base image's.
RUN pip install \
        transformers==5.24.0 \
        trl==1.16.0 \
        peft==0.21.2 \
        accelerate==1.15.0 \
        deepspeed==0.19.8 \
        datasets==5.2.0 \
        bitsandbytes==0.50.2 \
        wandb==0.31.0 \
        safetensors==0.8.0 \
        tokenizers==0.23.3 \
        pyyaml==6.0.4 \
        matplotlib==3.11.2 \
        tqdm==4.70.1

RUN useradd --create-home --uid 1000 rgrl \
    && mkdir -p /hf-cache /workspace/rgrl/outputs \
    && chown -R rgrl:rgrl /hf-cache /workspace
WORKDIR /workspace/rgrl
COPY --chown=rgrl:rgrl . .
RUN pip install --no-deps . && python -c "import rgrl, trl, deepspeed"

USER rgrl
VOLUME ["/hf-cache"]
ENTRYPOINT ["/bin/bash", "-c", "exec accelerate launch --config_file \"$ACCELERATE_CONFIG\" $ACCELERATE_ARGS -m rgrl.train \"$@\"", "rgrl-train"]
CMD ["recipes/tiny_dream.yaml"]
