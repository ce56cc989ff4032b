# The course in a Linux container, for machines where Triton does not install (macOS, Windows):
#   docker build -t moe-learn .
#   docker run --rm -it -p 8888:8888 -v "$PWD/notebooks:/course/notebooks" moe-learn
# then open the http://127.0.0.1:8888/lab/tree/notebooks?token=... address it prints. The -v keeps
# your notebooks on your machine. It runs the README's `make lab`; the image has PyTorch's CPU build
# (build with --build-arg TORCH_INDEX= for PyPI's CUDA build, and run with --gpus all).
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /course
COPY . .

# Install while building, so that `make lab` starts at once.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN make .venv/.installed TORCH_INDEX="$TORCH_INDEX" && rm -rf /root/.cache/pip

EXPOSE 8888
# All interfaces (the port is published from inside the container), no browser to open in here.
# As root, jupyter/jupyter_server_config.py allows JupyterLab to run.
CMD ["make", "lab", "LAB_ARGS=--ip=0.0.0.0 --port=8888 --no-browser"]
