# pymetric: `make demo` (train the CPU demo), `make test` (the whole test suite, with the TensorFlow
# export tests) and `make test-fast` (the inner loop: no end-to-end tests, no TensorFlow venv).
# All create .venv on first use and reuse it afterwards.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CUDA build of torch; it also runs on CPU. Override for other platforms, e.g.
#   make demo TORCH_PKGS="torch==2.9.1 torchvision==0.24.1"
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.pymetric-installed

.PHONY: install tf-env demo sweep-demo test test-fast lint format clean-demo

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

# The demo sweep (docs/SWEEPS.md): ArcFace / CosFace / Circle x 2 margins x 2 seeds on the demo data.
# Launching again resumes it; `rm -rf output/sweeps/demo_margins` starts over.
# SWEEP_DEMO / SWEEP_DIR (its ROOT_DIR/NAME) may name another sweep config.
SWEEP_DEMO ?= configs/sweeps/demo_margins.yaml
SWEEP_DIR ?= output/sweeps/demo_margins
sweep-demo: $(STAMP)
	$(PY) tools/make_demo_data.py
	test -f $(SWEEP_DIR)/setup.json || $(PY) tools/sweep_setup.py --sweep-cfg $(SWEEP_DEMO)
	-$(PY) tools/sweep_launch.py --sweep-cfg $(SWEEP_DEMO)
	$(PY) tools/sweep_collect.py --sweep-cfg $(SWEEP_DEMO)
	$(PY) tools/sweep_analyze.py --sweep-cfg $(SWEEP_DEMO)

# Everything, the 30 slowest tests listed at the end.
test: $(STAMP) tf-env
	$(PY) -m pytest -q --durations=30 tests

# The fast tier: leaves out the end-to-end tests (marker slow) and those that need .venv-tf (tf).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not tf" tests

# ruff (configured in ruff.toml): lint and import order, and the formatting check.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rewrite the sources as `make lint` wants them (import order, formatting).
format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-demo:
	rm -rf output/demo metric/datasets/data/demo
