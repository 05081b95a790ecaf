# GPU image: NVIDIA's PyTorch container (CUDA, NCCL, cuDNN, TransformerEngine, apex) plus nemo_aligner
# with the wandb and megatron (megatron-core, for model.engine=megatron) extras. Build:  docker build -t nemo_aligner .
# Run:    docker run --gpus all --ipc=host --rm -it nemo_aligner \
#           torchrun --nproc_per_node 8 examples/nlp/gpt/train_gpt_dpo.py trainer.devices=8 ...
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/nemo_aligner
COPY pyproject.toml setup.py README.md ./
COPY nemo_aligner ./nemo_aligner
# The base image's torch satisfies the torch requirement, so pip leaves the CUDA build in place.
RUN pip install --no-cache-dir -e ".[wandb,megatron]"
COPY examples ./examples
COPY benchmarks ./benchmarks

ENV PYTHONUNBUFFERED=1
