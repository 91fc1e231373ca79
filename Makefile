# d2_norms: `make demo` trains and evaluates a small detector on CPU; `make test` runs the tests.
# Both set up .venv first (idempotent: re-running only re-installs when setup inputs changed).
PYTHON_BASE ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2_norms_setup_done
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean-venv

setup: $(STAMP)

$(STAMP): setup.py requirements/detectron2.txt tools/install_detectron2.py Makefile
	@$(PYTHON_BASE) -c 'import sys; assert sys.version_info[:2] == (3, 11), "d2_norms set-up needs Python 3.11, got " + sys.version.split()[0] + "; set PYTHON_BASE=/path/to/python3.11"'
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	# torch first, pinned, so that nothing later can pull another build.
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test]' $(TORCH_PINS)
	$(PY) tools/install_detectron2.py
	$(PY) -c 'import d2_norms, detectron2, torch; print("d2_norms set-up OK: torch", torch.__version__, "detectron2", detectron2.__version__, "shims:", d2_norms.compat.applied())'
	touch $(STAMP)

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) tools/benchmark_layers.py

clean-venv:
	rm -rf $(VENV)
