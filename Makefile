# d2_norms: `make demo` trains and evaluates a small detector on CPU; `make test` runs the tests.
# Both set up .venv first (idempotent: re-running only re-installs when setup inputs changed).
PYTHON_BASE ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2_norms_setup_done
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# `make test`: the fast tests (every module; minutes), spread over the cores (pytest-xdist).
# `make test-slow`: the end-to-end tests marked slow (training runs, gloo processes, the CLI
# scripts; ~20 min on 2 cores), one at a time. CI (.ci/run) runs both, then test-d2main.
TEST_WORKERS ?= auto

# detectron2 main (make test-d2main): a second venv with detectron2 installed from a source
# snapshot by tools/install_detectron2.py --source (C++ ops when they build, else pure Python).
D2MAIN_VENV ?= .venv-d2main
D2MAIN_SOURCE ?= ../shared/third_party/detectron2-02b5c4e2.tar.gz
D2MAIN_OPS ?= auto
# Where the second venv's packages come from: hard links to this venv's files when it is set up
# (the same pinned torch build; pip never rewrites an installed file in place, so the two venvs
# stay independent), which saves re-installing ~6 GB; empty = install everything with pip.
D2MAIN_LINK_FROM ?= $(VENV)
D2MAIN_PY := $(D2MAIN_VENV)/bin/python
D2MAIN_STAMP := $(D2MAIN_VENV)/.d2_norms_d2main_done
# One short train + eval through tools/train_net.py (12 iterations on the tiny synthetic set),
# and the LazyConfigs with both lazy trainers: detectron2 main's own tools/lazyconfig_train_net.py
# and d2_norms' (a user's config from detectron2's common models, every normalizer).
D2MAIN_TRAIN_EVAL := tests/test_train_e2e.py tests/test_lazyconfig.py -m slow \
	-k "test_training_writes_what_detectron2_writes or test_training_evaluates_bbox_and_segm_with_cocoeval or test_detectron2s_own_lazy_trainer_runs_d2_norms_configs or test_users_detectron2_config_trains_finite_with_d2_norms_trainer"

.PHONY: setup demo test test-fast test-slow test-all bench clean-venv test-d2main setup-d2main d2main-run

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
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-fast: test

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: test test-slow

bench: setup
	$(PY) tools/benchmark_layers.py

clean-venv:
	rm -rf $(VENV)

# On a machine without the snapshot (a user's: ../shared is test material) this says so and
# succeeds, so CI scripts can call it unconditionally.
test-d2main:
	@if [ -e "$(D2MAIN_SOURCE)" ]; then \
		$(MAKE) --no-print-directory d2main-run; \
	else \
		echo "test-d2main: skipped: $(D2MAIN_SOURCE) not found (the detectron2 main snapshot is test material that only CI and the project's machines have; set D2MAIN_SOURCE=<detectron2 tree or .tar.gz> to use another)"; \
	fi

setup-d2main: $(D2MAIN_STAMP)

d2main-run: $(D2MAIN_STAMP)
	$(D2MAIN_PY) -m pytest -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)
	$(D2MAIN_PY) -m pytest $(D2MAIN_TRAIN_EVAL) $(PYTEST_ARGS)

$(D2MAIN_STAMP): $(D2MAIN_SOURCE) setup.py tools/install_detectron2.py Makefile
	@$(PYTHON_BASE) -c 'import sys; assert sys.version_info[:2] == (3, 11), "d2_norms set-up needs Python 3.11, got " + sys.version.split()[0] + "; set PYTHON_BASE=/path/to/python3.11"'
	@if [ ! -x $(D2MAIN_PY) ]; then \
		echo "creating $(D2MAIN_VENV)"; \
		$(PYTHON_BASE) -m venv $(D2MAIN_VENV) || exit 1; \
		if [ -n "$(D2MAIN_LINK_FROM)" ] && [ -f "$(D2MAIN_LINK_FROM)/.d2_norms_setup_done" ]; then \
			echo "hard-linking the installed packages of $(D2MAIN_LINK_FROM) into $(D2MAIN_VENV) (D2MAIN_LINK_FROM= to install them with pip instead)"; \
			cp -alf "$(D2MAIN_LINK_FROM)/lib/python3.11/site-packages/." "$(D2MAIN_VENV)/lib/python3.11/site-packages/" || { \
				echo "hard links failed (another file system?): installing with pip"; \
				rm -rf "$(D2MAIN_VENV)"; $(PYTHON_BASE) -m venv $(D2MAIN_VENV) || exit 1; }; \
		fi; \
	fi
	$(D2MAIN_PY) -m pip install --quiet $(TORCH_PINS)
	$(D2MAIN_PY) -m pip install --quiet --no-build-isolation -e '.[test]' $(TORCH_PINS)
	$(D2MAIN_PY) tools/install_detectron2.py --source $(D2MAIN_SOURCE) --ops $(D2MAIN_OPS)
	$(D2MAIN_PY) -c 'import d2_norms, detectron2, torch; print("d2main set-up OK: torch", torch.__version__, "detectron2", detectron2.__version__, "from", detectron2.__file__, "shims:", d2_norms.compat.applied())'
	touch $(D2MAIN_STAMP)
