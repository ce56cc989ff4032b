# The two commands of the README. Both make their own virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# Where torch comes from. PyPI's torch for Linux x86_64 is the CUDA build (several GB), so
# without a working NVIDIA driver the default is PyTorch's CPU index; where `nvidia-smi` works
# it is pip's default index (PyPI: the CUDA build). TORCH_INDEX= (empty) always means pip's
# default; any other index URL works too (e.g. https://download.pytorch.org/whl/cu128).
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(if $(shell nvidia-smi >/dev/null 2>&1 && echo cuda),,$(CPU_INDEX))
# Extra arguments for `jupyter lab` (the Dockerfile passes --ip=0.0.0.0 --no-browser).
LAB_ARGS ?=

.PHONY: lab test lint notebooks

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# An index that cannot be reached (offline, firewalled CI) falls back to pip's own
	@# configuration: a local wheel or mirror where pip is set up with one, else PyPI.
	@if [ -z "$(TORCH_INDEX)" ]; then \
		echo "Installing $(TORCH) from pip's default index"; \
		$(BIN)/python -m pip install --quiet "$(TORCH)"; \
	elif $(BIN)/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20)" \
			"$(TORCH_INDEX)/torch/" 2>/dev/null; then \
		echo "Installing $(TORCH) from $(TORCH_INDEX)"; \
		$(BIN)/python -m pip install --quiet --index-url "$(TORCH_INDEX)" "$(TORCH)"; \
	else \
		echo "$(TORCH_INDEX) cannot be reached: installing $(TORCH) from pip's default index and configuration."; \
		echo "(A local wheel or mirror that pip is set up with wins; if none, on Linux x86_64 this is PyPI's CUDA build: several GB.)"; \
		$(BIN)/python -m pip install --quiet "$(TORCH)"; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@$(BIN)/python -c "import torch; print('Installed torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
	touch $@

# jupyter/ holds the course's JupyterLab settings: rooted here (notebooks/ and solutions/ both
# reachable), opening on notebooks/, no news pop-up, --allow-root when run as root. Settings of
# your own (~/.jupyter) still win.
lab: $(VENV)/.installed
	JUPYTER_CONFIG_PATH="$(CURDIR)/jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" $(BIN)/jupyter lab $(LAB_ARGS)

test: $(VENV)/.installed
	$(BIN)/ruff check moe_learn tests solutions
	$(BIN)/python -m pytest -n 2 --dist loadfile

notebooks: $(VENV)/.installed
	$(BIN)/python -m moe_learn.course.notebook_build
