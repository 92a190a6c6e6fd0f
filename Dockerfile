# One image for every w2s role; the command picks the role (see docker-compose.yml).
# GPU images: build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.4,<3"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY services services
COPY workers workers
COPY models models
COPY db db
RUN pip install --no-cache-dir .
ENV W2S_CHECKPOINT_DIR=/checkpoints TOKENIZERS_PARALLELISM=false
ENTRYPOINT ["w2sctl"]
CMD ["--help"]
