# Two commands on a fresh machine: `make bench` (the main job) and `make test`.
# The torch venv (~6 GB) lives outside the clone, in a cache dir keyed by the requirements,
# so fresh clones reuse it; override with VENV=... or DK_CACHE=...
SHELL := /bin/bash
PYTHON ?= python3
REQS := requirements/dev.txt
DK_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/deltal-kernels
hash = $(shell cat $(1) | sha256sum | cut -c1-12)
VENV ?= $(DK_CACHE)/venv-$(call hash,$(REQS))
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv install test bench gpu-check gpu-check-dry-run gpu-wheels test-verl compat-venv install-compat \
	test-compat test-asan clean

# $(call make-venv,DIR,REQUIREMENTS[,PYTHON]): a fresh venv in DIR; DIR/.complete marks a finished install
define make-venv
rm -rf $(1)
$(or $(3),$(PYTHON)) -m venv $(1)
$(1)/bin/pip install -q --upgrade pip
$(1)/bin/pip install -r $(2)
touch $(1)/.complete
endef

venv: $(VENV)/.complete

# no prerequisite on the requirements file: its hash is in the venv's name, and a fresh clone's
# file is always newer than the cached venv
$(VENV)/.complete:
	$(call make-venv,$(VENV),$(REQS))

# ---- the editable install, incremental ------------------------------------------------------------
# A stamp in the venv (holding this clone's path) is remade when a build input changed, when the venv
# was last installed from another clone, or when this clone has no compiled extension for the venv's
# Python; otherwise `make install` (and so `make test`, `make bench`) skips pip altogether. Python
# files need no reinstall (editable). ninja rebuilds only the changed objects (build/temp-editable-*).
BUILD_INPUTS := setup.py pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

# $(call stale-stamp,VENV): the venv's install stamp, made phony (always remade) when stale as above
define stale-stamp
$(if $(filter $(CURDIR),$(shell cat $(1)/.dk-install 2>/dev/null)),\
$(if $(wildcard deltal_kernels/_C$(shell [ -x $(1)/bin/python ] && $(1)/bin/python -c \
'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)),,$(1)/.dk-install),$(1)/.dk-install)
endef
.PHONY: $(strip $(call stale-stamp,$(VENV)))

# ninja's output is block-buffered when it goes to a pipe: line-buffered through stdbuf (coreutils)
STDBUF := $(if $(shell command -v stdbuf 2>/dev/null),stdbuf -oL)

# $(call editable-install,VENV,LOG): pip install -e . into VENV; one line per compile step on the
# screen (ninja's [k/n] and the source), everything in LOG
define editable-install
@mkdir -p build
@echo "install: building deltal_kernels (C++$(if $(DELTAL_KERNELS_NO_CUDA),, and CUDA) extension) into $(1); full log: $(2)"
@set -o pipefail; t0=$$(date +%s); \
if PYTHONUNBUFFERED=1 $(STDBUF) $(1)/bin/python -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee $(2) | scripts/build_progress.sh; then \
	echo "install: done in $$(( $$(date +%s) - t0 )) s"; echo "$(CURDIR)" > $(1)/.dk-install; \
else \
	echo "install: FAILED after $$(( $$(date +%s) - t0 )) s; the end of $(2):"; tail -n 40 $(2); exit 1; \
fi
endef

install: $(VENV)/.dk-install
$(VENV)/.dk-install: $(VENV)/.complete $(BUILD_INPUTS)
	$(call editable-install,$(VENV),build/install.log)

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/deltal-bench

# ---- the GPU machine (issue 12) -------------------------------------------------------------------
# On a machine with a CUDA GPU, as it is (its python3, no venv, no registry): build, the whole suite on
# CUDA, compute-sanitizer, the quick benchmark, ncu; results in $OUT or bench/results/gpu-<gpu>-<date>/
GPU_PY ?= python3
gpu-check:
	PY=$(GPU_PY) scripts/gpu_check.sh

# here, no GPU needed: the script's plumbing, with the steps that need a GPU rehearsed on the CPU
gpu-check-dry-run: install
	PY=$(PY) scripts/gpu_check.sh --dry-run --out build/gpu-check-dry-run

# the liger-kernel wheel the GPU check benchmarks against (pure Python; carried there in wheels/,
# which .git/info/exclude keeps out of git)
LIGER_VERSION ?= 0.8.5
gpu-wheels:
	$(PYTHON) -m pip download --no-deps -d wheels liger-kernel==$(LIGER_VERSION)

# ---- the compatibility venv: the GPU machine's stack (Python 3.12, torch 2.11.0, Triton 3.6) -------
# The oldest torch setup.py claims. Slow (its own torch, its own build): not part of .ci/run.
# The extension builds in place beside the dev venv's (another Python: another _C.cpython-3XX-*.so).
COMPAT_REQS := requirements/compat.txt
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
	$(shell command -v python3.12 2>/dev/null) python3.12)
COMPAT_VENV ?= $(DK_CACHE)/venv-compat-$(call hash,$(COMPAT_REQS))
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_PYTEST_ARGS ?= --timeout 900

compat-venv: $(COMPAT_VENV)/.complete
$(COMPAT_VENV)/.complete:
	$(call make-venv,$(COMPAT_VENV),$(COMPAT_REQS),$(COMPAT_PYTHON))

.PHONY: $(strip $(call stale-stamp,$(COMPAT_VENV)))
install-compat: $(COMPAT_VENV)/.dk-install
$(COMPAT_VENV)/.dk-install: $(COMPAT_VENV)/.complete $(BUILD_INPUTS)
	$(call editable-install,$(COMPAT_VENV),build/install-compat.log)

test-compat: install-compat
	$(COMPAT_PY) -c "import sys, torch, triton; print('compat:', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
	$(COMPAT_PY) -m pytest tests $(COMPAT_PYTEST_ARGS) $(PYTEST_ARGS)

# ---- AddressSanitizer over the C++ CPU kernels ------------------------------------------------------
# The CPU part of the extension built with -fsanitize=address into build/asan/ (its own objects and
# library: the in-tree build is untouched), the package's Python files copied beside it, and the
# extension tests run against that copy (python -P: the clone itself is not on sys.path) with libasan
# preloaded (python is not built with ASan), and libstdc++ after it (else ASan's __cxa_throw
# interceptor finds no real one when Triton's library, imported by the tests, throws: a CHECK failure).
ASAN_DIR := build/asan
ASAN_FLAGS := -fsanitize=address -fno-omit-frame-pointer -g
test-asan: venv
	DELTAL_KERNELS_NO_CUDA=1 DELTAL_KERNELS_CXXFLAGS="$(ASAN_FLAGS)" DELTAL_KERNELS_LDFLAGS="-fsanitize=address" \
		$(PY) setup.py -q build_ext --build-temp $(ASAN_DIR)/temp --build-lib $(ASAN_DIR)/lib 2>&1 \
		| tee build/asan-build.log | scripts/build_progress.sh
	rm -rf $(ASAN_DIR)/site && mkdir -p $(ASAN_DIR)/site
	cp -r deltal_kernels $(ASAN_DIR)/site/ && rm -f $(ASAN_DIR)/site/deltal_kernels/_C*.so
	cp $(ASAN_DIR)/lib/deltal_kernels/_C*.so $(ASAN_DIR)/site/deltal_kernels/
	export LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0 PYTHONPATH=$(CURDIR)/$(ASAN_DIR)/site; \
	$(PY) -P -c "import deltal_kernels.extension as e; assert e._C is not None and '$(ASAN_DIR)/site' in e._C.__file__, e._C; \
		print('ASan build:', e._C.__file__)" && \
	$(PY) -P -m pytest -p no:cacheprovider tests/test_extension.py $(PYTEST_ARGS) && \
	$(PY) -P -m pytest -p no:cacheprovider tests/test_backends.py -k cpu $(PYTEST_ARGS)

# verl pins its own transformers and pulls ray: its parity tests get their own venv. megatron-core
# (verl's and Megatron's vocabulary-parallel functions, tests/test_parallel_parity.py) declares
# Python >= 3.12 but ships a cp311 wheel that imports on 3.11 with what verl brings (torch, numpy,
# packaging): installed after the requirements without the metadata checks. It is in the venv's hash.
VERL_REQS := requirements/verl.txt
VERL_NODEPS := megatron-core==0.19.2
VERL_VENV ?= $(DK_CACHE)/venv-verl-$(shell (cat $(VERL_REQS); echo '$(VERL_NODEPS)') | sha256sum | cut -c1-12)
$(VERL_VENV)/.complete:
	rm -rf $(VERL_VENV)
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/pip install -q --upgrade pip
	$(VERL_VENV)/bin/pip install -r $(VERL_REQS)
	$(VERL_VENV)/bin/pip install --no-deps --ignore-requires-python $(VERL_NODEPS)
	touch $@

test-verl: $(VERL_VENV)/.complete
	PYTHONPATH=$(CURDIR) $(VERL_VENV)/bin/python -m pytest tests/test_integrations_verl.py \
		tests/test_parallel_parity.py $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info deltal_kernels/*.so
	rm -f $(VENV)/.dk-install $(COMPAT_VENV)/.dk-install
