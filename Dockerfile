# GPU image: NGC PyTorch (CUDA, NCCL, Apex, Transformer Engine) + vLLM + this package.
# docker build -t megatron-async-rlhf .
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}
WORKDIR /workspace/megatron_async_rlhf
COPY pyproject.toml README.md ./
COPY megatron_async_rlhf ./megatron_async_rlhf
COPY tools ./tools
COPY conf ./conf
COPY examples ./examples
# transformer-engine and apex ship with the NGC image; the gpu extra adds vLLM (and TE if the image lacks it)
RUN pip install --no-cache-dir -e ".[gpu]"
ENV PYTHONUNBUFFERED=1
CMD ["python", "-m", "megatron_async_rlhf", "--help"]
