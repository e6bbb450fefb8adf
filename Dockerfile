# tagmill's image: `tagmill …` for any command, and SageMaker's container contract
# (`IMAGE train`, `IMAGE serve` with /opt/ml as SageMaker lays it out). README.md,
# "Container", says how to build a CPU-only or a CUDA image.
#
#   podman build --format docker -t tagmill .        (or: docker build -t tagmill .)
#
# BASE: any Debian-like image with Python >= 3.11, pip and venv (the official slim
# image by default; the tests build on a Debian base they bootstrap themselves).
ARG BASE=python:3.11-slim-bookworm

# --- build: tagmill's own wheel (pip fetches setuptools into an isolated build env)
FROM ${BASE} AS build
# pip's own settings, for a build behind a proxy or from local package folders (tests/container
# passes this machine's); unset unless given
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# --- the image: a virtual environment, no build tools, a non-root user
FROM ${BASE}
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
# An index for torch's wheels other than PyPI's (PyPI's x86_64 torch is the CUDA build,
# ~5.5 GB installed; PyTorch's CPU-only index gives ~0.7 GB): README.md, "Container".
ARG TORCH_INDEX_URL=
# torch and torchvision exactly as pyproject.toml pins them (tests/test_container_files.py checks)
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# The user the image runs as. SageMaker's /opt/ml mounts may be writable by root only:
# README.md, "Container", says when to build with USER=root.
ARG USER=tagmill
# COLUMNS: without a terminal, the log lines would be wrapped at 80 characters
ENV VIRTUAL_ENV=/opt/tagmill \
    PATH=/opt/tagmill/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COLUMNS=160
RUN python -m venv /opt/tagmill
# torch alone in its own layer: the largest by far and the one that changes least, so a
# change to tagmill rebuilds only the small layer below it
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY --from=build /wheels /tmp/wheels
# with the explain extra (Grad-CAM, headless OpenCV: no X libraries needed), so the web
# page's "why?" and /predict?explain=true work in the image
RUN pip install --no-cache-dir "$(ls /tmp/wheels/tagmill-*.whl)[explain]" && rm -rf /tmp/wheels
COPY container/entrypoint.sh /usr/local/bin/tagmill-entrypoint
COPY container/healthcheck.py /usr/local/bin/tagmill-healthcheck
RUN chmod 0755 /usr/local/bin/tagmill-entrypoint /usr/local/bin/tagmill-healthcheck \
    && if [ "$USER" != root ]; then useradd --create-home --uid 1000 --shell /usr/sbin/nologin "$USER"; fi \
    && mkdir -p /opt/ml/input/data /opt/ml/input/config /opt/ml/model /opt/ml/output \
    && chown -R "$USER" /opt/ml
USER ${USER}
WORKDIR /opt/ml
EXPOSE 8080
# /ping answers 200 once the model is loaded; `train` containers have no server and
# simply stay "starting"/"unhealthy", which nothing acts on
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["tagmill-healthcheck"]
ENTRYPOINT ["tagmill-entrypoint"]
CMD ["tagmill", "--help"]
