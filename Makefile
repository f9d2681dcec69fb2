# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install into it.
# The test stack is installed from locks/test.txt (pip constraints: exact versions of every package), so a
# new release of a dependency cannot change what CI runs; `make test-latest` resolves afresh on purpose.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LOCK   := locks/test.txt
GPU_VENV := .venv-gpu-plan
GPU_BIN  := $(GPU_VENV)/bin
GPU_LOCK := locks/gpu-plan.txt
# The tier's tests import no torch, so they run in the gpu-plan venv (which has none).
GPU_TESTS := tests/test_gpu_plan.py tests/test_gpu_plan_fp8.py tests/test_gpu_plan_mesh.py tests/test_train_plan.py \
             tests/test_gpu_plan_mosaic.py tests/test_gpu_plan_lowmem.py
TPU_VENV := .venv-tpu-plan
TPU_BIN  := $(TPU_VENV)/bin
TPU_LOCK := locks/tpu-plan.txt
TPU_TESTS := tests/test_tpu_plan.py

.PHONY: demo nano lint test check test-latest lock install install-test gpu-plan gpu-plan-room tpu-plan tpu-plan-room \
        browser-test serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install: no torch, the locked versions.
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install -q --no-cache-dir -c $(LOCK) -e .
	touch $@

# Test install: the pinned PyTorch reference as well; prints what it installed.
$(VENV)/.installed-test: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install -q --no-cache-dir -c $(LOCK) -e ".[test]"
	@echo "installed from $(LOCK):"; $(BIN)/python -m pip freeze --exclude-editable | grep -iE '^(jax|jaxlib|flax|orbax-checkpoint|optax|torch|diffusers|transformers|peft|safetensors|numpy)==' | tr '\n' ' '; echo
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The embedded nano model (helios_jax/nano/checkpoint, docs/nano.md): ten chunks of one caption, then ten whose caption
# switches after five, each scored against the world's rules by `helios-jax eval`.
DEMO_PROMPT := a red circle moves right on a dark blue background
demo: install
	mkdir -p out
	$(BIN)/helios-jax generate --output out/demo.mp4 --overwrite --num_frames 330 --is_amplify_first_chunk \
	  --prompt "$(DEMO_PROMPT)"
	$(BIN)/helios-jax eval out/demo.mp4 --prompt "$(DEMO_PROMPT)"
	$(BIN)/helios-jax generate --output out/demo-switch.mp4 --overwrite --num_frames 330 --is_amplify_first_chunk \
	  --interactive_prompt_csv_path helios_jax/nano/demo-switch.csv --interpolate_time 5
	$(BIN)/helios-jax eval out/demo-switch.mp4 --interactive_prompt_csv_path helios_jax/nano/demo-switch.csv \
	  --interpolate_time 5

# The nano model trained from nothing (helios_jax/nano/recipe.py): every step's output in $(NANO_RUN)/, the student
# copied to helios_jax/nano/checkpoint/. About an hour on two CPU cores; a rerun continues where it stopped.
NANO_RUN ?= nano-run
nano: install
	$(BIN)/python -m helios_jax.nano.recipe --run $(NANO_RUN) --ship

# The suite on two pytest-xdist workers, a test file each at a time (--dist loadfile: a file's module fixtures are built
# once), in the order tests/conftest.py gives, the slowest files first (--no-loadscope-reorder keeps it). Nearly all
# of its time is XLA's compile, one core a program: two workers use CI's two cores.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# ruff (pinned in the test extra and the lock; configured in pyproject.toml), about a second: run first by `make test`.
lint: install-test
	$(BIN)/python -m ruff check .

test: install-test lint
	$(PYTEST) $(PYTEST_ARGS)
	@if [ -x $(GPU_BIN)/python ]; then echo "gpu-plan tier (jax's CUDA plugin is in $(GPU_VENV)):"; \
	  HELIOS_TEST_XLA_FLAGS= JAX_PLATFORMS=cpu $(GPU_BIN)/python -m pytest -m gpu_plan $(GPU_TESTS) $(PYTEST_ARGS); fi

# The edit loop, in under five minutes: the unit tests and one parity test per component (tests/check.txt, a pytest
# argument file).
check: install-test lint
	$(PYTEST) $(PYTEST_ARGS) @tests/check.txt

# A plan tier compiles the port's programs for a backend this machine does not have, with that backend's compiler in a
# venv of its own (runtime install, no torch; the compiler's wheels from their lock, exact versions, --no-deps), after a
# disk check, so that a short disk is one clear message. No pip cache (--no-cache-dir). The recipe, once for both tiers:
# $(1) the tier (its make target and, with `_`, its pytest marker), $(2) its venv, $(3) its lock, $(4) the GB of disk it
# needs, $(5) environment for its tests, $(6) its test files.
define PLAN_TIER
$(1)-room:
	@free=$$$$(df -Pk . | awk 'NR==2 {print int($$$$4 / 1048576)}'); if [ $$$$free -lt $(4) ]; then \
	  echo "$(1): $$$$free GB of disk free here, its venv needs $(4) GB" >&2; exit 1; fi

$(2)/.installed: pyproject.toml $$(LOCK) $(3)
	@$$(MAKE) -s $(1)-room
	rm -rf $(2)
	$$(PYTHON) -m venv $(2)
	$(2)/bin/python -m pip install -q --no-cache-dir --upgrade pip
	@start=$$$$(date +%s); \
	$(2)/bin/python -m pip install -q --no-cache-dir -c $$(LOCK) -e . pytest && \
	$(2)/bin/python -m pip install -q --no-cache-dir --no-deps -r $(3) && \
	echo "installed the $(1) tier from $(3) in $$$$(( $$$$(date +%s) - start )) s ($$$$(du -sh $(2) | cut -f1))"
	touch $$@

$(1): $(2)/.installed
	HELIOS_TEST_XLA_FLAGS= JAX_PLATFORMS=cpu $(5) $(2)/bin/python -m pytest -m $(subst -,_,$(1)) $(6) $$(PYTEST_ARGS)
endef

# The H100 plans compiled on this CPU (no GPU): jax's CUDA plugin of the locked jax and the nvidia-* wheels the
# compiler uses (locks/gpu-plan.txt: 2.9 GB installed) in a venv of its own, because on a machine without a GPU the
# plugin makes every jax start-up try cuInit and print its failure (~3 s): the main venv, which runs the CLI and the
# demo, stays clean.
$(eval $(call PLAN_TIER,gpu-plan,$(GPU_VENV),$(GPU_LOCK),4,,$(GPU_TESTS)))

# `helios-jax serve` (docs/serving.md) with the embedded nano model at http://127.0.0.1:8000/ (SERVE_ARGS: its flags).
serve: install
	$(BIN)/python -m pip install -q --no-cache-dir -c $(LOCK) -e ".[serve]"
	$(BIN)/helios-jax serve $(SERVE_ARGS)

# The real-browser tier (tests/test_serve_browser.py, marker browser; not in make test): `helios-jax serve` with the nano
# model, its page in Debian's headless Chromium (apt-get, as root: CI's machines are the same kind), driven by Playwright
# (pip, locked) through the system binary: no browser download. Idempotent; writes out/serve-screenshot.png.
$(VENV)/.installed-browser: pyproject.toml $(LOCK) $(VENV)/.installed-test
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }
	$(BIN)/python -m pip install -q --no-cache-dir -c $(LOCK) -e ".[test,browser]"
	touch $@

browser-test: $(VENV)/.installed-browser
	$(BIN)/python -m pytest -m browser tests/test_serve_browser.py $(PYTEST_ARGS)

# The TPU plans compiled on this CPU (no TPU): libtpu of the locked jax (locks/tpu-plan.txt, exact versions, --no-deps:
# 1.6 GB installed with the runtime) in a venv of its own, as the gpu-plan tier and for the same reason (libtpu looks for
# a TPU as jax starts). Its topologies give v5e, v6e and v5p devices; experiments/plans/tpu_plan.py, docs/tpu.md.
$(eval $(call PLAN_TIER,tpu-plan,$(TPU_VENV),$(TPU_LOCK),3,TPU_SKIP_MDS_QUERY=1,$(TPU_TESTS)))

# Not in CI: the newest releases the ranges in pyproject.toml allow, in a separate venv, to find drift early.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q -e ".[test]"
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -iE '^(jax|flax|torch|diffusers|transformers)=='
	.venv-latest/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Rewrite the lock from a fresh resolution of pyproject.toml's ranges (then run `make test` before committing it).
# The browser extra too, so that make browser-test installs a locked Playwright.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -e ".[test,browser]"
	{ head -n 2 $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(GPU_VENV) $(TPU_VENV) .venv-latest .venv-lock build *.egg-info
