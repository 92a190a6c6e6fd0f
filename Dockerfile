# One image for every w2s role; the command picks the role (see docker-compose.yml).
# GPU images: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.4,<3"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# pdsh + ssh client: DeepSpeed's multi-node launcher (docs/deployment.md).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git pdsh openssh-client \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY cli cli
COPY services services
COPY workers workers
COPY models models
COPY db db
RUN pip install --no-cache-dir .
# Not root: a worker that loads models and runs jobs needs no privileges. /checkpoints belongs to
# it, so the named volume mounted there starts out writable.
RUN useradd --create-home --uid 1000 w2s && mkdir -p /checkpoints && chown w2s:w2s /checkpoints
USER w2s
ENV W2S_CHECKPOINT_DIR=/checkpoints TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
ENTRYPOINT ["w2sctl"]
CMD ["--help"]
