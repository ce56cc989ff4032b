# The two commands of the README. Both make their own virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch installs quickly; on a CUDA machine pass TORCH=torch to get the GPU build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: lab test lint notebooks

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

lab: $(VENV)/.installed
	$(BIN)/jupyter lab notebooks/

test: $(VENV)/.installed
	$(BIN)/ruff check moe_learn tests solutions
	$(BIN)/python -m pytest -n 2 --dist loadfile

notebooks: $(VENV)/.installed
	$(BIN)/python -m moe_learn.course.notebook_build
