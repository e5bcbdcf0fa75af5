# pymetric: `make demo` (train the CPU demo) and `make test` (the whole test suite).
# Both create .venv on first use and reuse it afterwards.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CUDA build of torch; it also runs on CPU. Override for other platforms, e.g.
#   make demo TORCH_PKGS="torch==2.9.1 torchvision==0.24.1"
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.pymetric-installed

.PHONY: install tf-env demo test clean-demo

$(STAMP): setup.py requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check $(TORCH_PKGS)
	$(PIP) install --quiet --disable-pip-version-check -e ".[test]"
	@touch $@

install: $(STAMP)

# TensorFlow + onnx2tf for the exporter live in their own venv (their pins clash with ours).
tf-env:
	bash tools/setup_tf_env.sh

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP) tf-env
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf output/demo metric/datasets/data/demo
