# `make demo` and `make test` do all set-up on a fresh machine: they create .venv and install into it.
# The test stack is installed from locks/test.txt (pip constraints: exact versions of every package), so a
# new release of a dependency cannot change what CI runs; `make test-latest` resolves afresh on purpose.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LOCK   := locks/test.txt

.PHONY: demo test test-latest lock install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install: no torch, the locked versions.
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install -q -c $(LOCK) -e .
	touch $@

# Test install: the pinned PyTorch reference as well; prints what it installed.
$(VENV)/.installed-test: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[test]"
	@echo "installed from $(LOCK):"; $(BIN)/python -m pip freeze --exclude-editable | grep -iE '^(jax|jaxlib|flax|orbax-checkpoint|optax|torch|diffusers|transformers|peft|safetensors|numpy)==' | tr '\n' ' '; echo
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	mkdir -p out
	$(BIN)/helios-jax generate --output out/demo.mp4

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Not in CI: the newest releases the ranges in pyproject.toml allow, in a separate venv, to find drift early.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q -e ".[test]"
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -iE '^(jax|flax|torch|diffusers|transformers)=='
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)

# Rewrite the lock from a fresh resolution of pyproject.toml's ranges (then run `make test` before committing it).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q -e ".[test]"
	{ head -n 2 $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-latest .venv-lock build *.egg-info
