# hrseg — two commands do all the set-up on a fresh machine: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
FAKE8   := --xla_force_host_platform_device_count=8
XVFB    := $(shell command -v xvfb-run 2>/dev/null)
# Which jax build `make install` puts in: cpu (default), cuda (NVIDIA, CUDA 12) or tpu (TPU VM).
# Once installed, later `make` calls keep the venv's build (`make test` never swaps it back).
INSTALLED := $(patsubst $(VENV)/.installed-%,%,$(wildcard $(VENV)/.installed-*))
ACCEL   ?= $(or $(filter cpu cuda tpu,$(firstword $(subst -, ,$(INSTALLED)))),cpu)
PARAMS  ?= params/notebooks/default
# Notebooks executed at once by `make run`: 2 on CPU (one kernel leaves a core idle while it
# compiles or starts), 1 on an accelerator (two kernels would share its memory).
JOBS    ?= $(if $(filter cpu,$(ACCEL)),2,1)
ifeq ($(filter $(ACCEL),cpu cuda tpu),)
$(error ACCEL=$(ACCEL): use ACCEL=cpu, ACCEL=cuda or ACCEL=tpu)
endif
comma   := ,
EXTRAS  := all$(if $(filter-out cpu,$(ACCEL)),$(comma)$(ACCEL))
STAMP   := $(VENV)/.installed-$(ACCEL)-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test test-core test-multidevice test-napari lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(BIN)/python -c "from hrseg.parallel import native; print(native.status())"
	rm -f $(VENV)/.installed-*; touch $@

# The main job: phantom data -> the five notebooks (papermill) -> results table, on CPU
# (on a GPU box / TPU VM: `make run PARAMS=params/notebooks/gpu` / `PARAMS=params/notebooks/tpu`).
run: install
	$(BIN)/hrseg run --params-dir $(PARAMS) --jobs $(JOBS)

# Unit tests (1 CPU device), multi-device tests (8 fake CPU devices, own process), napari (xvfb):
# two suites at a time (XLA compiles are single-threaded, so 2 cores nearly halve the wall time);
# each suite's output is printed in one block when it ends; any failure fails `make test`.
test: install
	@echo "make test: test-core, test-multidevice, test-napari, two at a time (output per suite when it ends)"
	@$(MAKE) --no-print-directory -k -j2 --output-sync=target test-core test-multidevice test-napari

test-core: install
	JAX_PLATFORMS=cpu $(BIN)/pytest -q --durations=12 tests --ignore=tests/multidevice --ignore=tests/napari

test-multidevice: install
	JAX_PLATFORMS=cpu XLA_FLAGS=$(FAKE8) $(BIN)/pytest -q --durations=12 tests/multidevice

test-napari: install
ifeq ($(XVFB),)
	@echo "SKIPPED napari tests: xvfb-run not found (apt-get install xvfb libgl1-mesa-dri; see .ci/run)"
else
	JAX_PLATFORMS=cpu xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/pytest -q tests/napari
endif

lint: install
	$(BIN)/ruff check hrseg tests benchmarks

bench: install
	JAX_PLATFORMS=cpu $(BIN)/python benchmarks/halo_vs_gspmd.py --json

clean:
	rm -rf $(VENV) runs build *.egg-info
