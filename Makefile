# Two commands on a fresh machine: `make bench` (the main job) and `make test`.
# The torch venv (~5.5 GB) lives outside the clone, in a cache dir keyed by the requirements,
# so fresh clones reuse it; override with VENV=... or DK_CACHE=...
SHELL := /bin/bash
PYTHON ?= python3
REQS := requirements/dev.txt
DK_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/deltal-kernels
VENV ?= $(DK_CACHE)/venv-$(shell cat $(REQS) | sha256sum | cut -c1-12)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv install test bench gpu-check test-verl clean

# $(call make-venv,DIR,REQUIREMENTS): a fresh venv in DIR; DIR/.complete marks a finished install
define make-venv
rm -rf $(1)
$(PYTHON) -m venv $(1)
$(1)/bin/pip install -q --upgrade pip
$(1)/bin/pip install -r $(2)
touch $(1)/.complete
endef

venv: $(VENV)/.complete

# no prerequisite on the requirements file: its hash is in the venv's name, and a fresh clone's
# file is always newer than the cached venv
$(VENV)/.complete:
	$(call make-venv,$(VENV),$(REQS))

# the package (and its compiled extension) installed editable from this clone
install: venv
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/deltal-bench

# on a machine with a CUDA GPU: build, whole test suite on CUDA (cuda + triton, Triton compiled, no
# interpreter), GPU benchmark; logs and results under bench/results/
gpu-check: venv
	PY=$(PY) scripts/gpu_check.sh

# verl pins its own transformers and pulls ray: its parity tests get their own venv
VERL_REQS := requirements/verl.txt
VERL_VENV ?= $(DK_CACHE)/venv-verl-$(shell cat $(VERL_REQS) | sha256sum | cut -c1-12)
$(VERL_VENV)/.complete:
	$(call make-venv,$(VERL_VENV),$(VERL_REQS))

test-verl: $(VERL_VENV)/.complete
	PYTHONPATH=$(CURDIR) $(VERL_VENV)/bin/python -m pytest tests/test_integrations_verl.py $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info deltal_kernels/*.so
