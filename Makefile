# Two commands on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Pinned for this project's machines (local CUDA wheels that run on the CPU too);
# the package itself accepts torch>=2.4.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test,data]" $(TORCH_PINS)
	@# Fashion-MNIST's original IDX files (Debian package); optional, needs root.
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: could not install dataset-fashion-mnist; cnnlab will download Fashion-MNIST when needed"; \
	fi
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/cnnlab demo

test: setup
	$(PY) -m pytest -n 2 -q

bench: setup
	$(PY) benchmarks/bench_models.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
