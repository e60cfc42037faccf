# keras-coat: `make demo` and `make test` create the environment themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.installed-demo
DETECT_STAMP := $(VENV)/.installed-detect
TEST_STAMP := $(VENV)/.installed-test
# The oldest Keras keras_coat supports (pyproject.toml), without dependencies (the venv's serve):
# the multi-worker TensorFlow test runs on it as well as on the venv's newest Keras.
OLDEST_KERAS := .venv-keras38

.PHONY: venv test test-tensorflow test-jax test-torch test-fast coverage demo demo-detect \
	bench bench-deploy clean

$(PY):
	@echo "==> creating the virtual environment $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip

# `make demo` needs only the core and the training extras (TensorFlow, TFDS, scikit-learn): pip
# prints each package it collects and downloads.
$(DEMO_STAMP): pyproject.toml | $(PY)
	@echo "==> installing keras-coat with its training extras (TensorFlow, TensorFlow Datasets," \
		"scikit-learn): a 2.6 GB environment, about 2 minutes from a fresh clone (2026-12-07)"
	$(PY) -m pip install --progress-bar on -e ".[train]"
	@echo "==> the environment takes $$(du -sh $(VENV) | cut -f1)"
	touch $@

# `make demo-detect` adds KerasHub and pycocotools.
$(DETECT_STAMP): $(DEMO_STAMP)
	@echo "==> installing the detection extras (KerasHub, pycocotools)"
	$(PY) -m pip install --progress-bar on -e ".[detect]"
	touch $@

# The tests need everything: JAX, PyTorch, timm (the reference), KerasHub, the export runtimes.
$(TEST_STAMP): pyproject.toml | $(PY)
	@echo "==> installing keras-coat with every extra the tests need (JAX, PyTorch, timm," \
		"KerasHub, LiteRT, ONNX Runtime, OpenVINO, coverage): about 9 GB the first time"
	$(PY) -m pip install --progress-bar on -e ".[test]"
	@echo "==> the environment takes $$(du -sh $(VENV) | cut -f1)"
	touch $@

$(OLDEST_KERAS)/.installed: $(TEST_STAMP)
	@echo "==> installing Keras 3.8 beside it ($(OLDEST_KERAS)) for the oldest-Keras test"
	rm -rf $(OLDEST_KERAS)
	$(PY) -m pip install --quiet --no-deps --target $(OLDEST_KERAS) "keras==3.8.*"
	touch $@

venv: $(TEST_STAMP) $(OLDEST_KERAS)/.installed

# One pytest pass per Keras backend over the whole tree; each test declares the backends it runs
# on (`@pytest.mark.backends(...)`, TensorFlow only by default; tests/conftest.py). Two workers
# (pytest-xdist), a test file each at a time: CI has 2 cores, many tests wait on subprocesses
# while the other worker computes, and a file's module-scoped fixtures (exports, trained and
# compiled runs) are built once. The longest files go first (conftest's LONGEST_FILES, kept in
# that order by --no-loadscope-reorder). Each pass prints its time, its slowest tests and every
# worker's peak resident memory.
PYTEST := TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile \
	--no-loadscope-reorder --durations=15
define pass
	@echo "==> tests on the $(1) backend"
	@start=$$(date +%s); KERAS_BACKEND=$(1) $(PYTEST) $(2); status=$$?; \
		echo "==> $(1) pass: $$(( $$(date +%s) - start )) s"; exit $$status
endef

test: $(TEST_STAMP) $(OLDEST_KERAS)/.installed
	$(call pass,tensorflow)
	$(call pass,jax)
	$(call pass,torch)

test-tensorflow test-jax test-torch: test-%: $(TEST_STAMP) $(OLDEST_KERAS)/.installed
	$(call pass,$*)

test-fast: $(TEST_STAMP)
	$(call pass,tensorflow,-m "not slow")

# Every pass under coverage (subprocesses included: pyproject's [tool.coverage.run]), combined
# into one line-coverage report of keras_coat/, training/ and conversion/.
COVERAGE_DATA := $(CURDIR)/.coverage-data
coverage: $(TEST_STAMP) $(OLDEST_KERAS)/.installed
	rm -rf $(COVERAGE_DATA) && mkdir -p $(COVERAGE_DATA)
	@for backend in tensorflow jax torch; do \
		echo "==> tests on the $$backend backend, under coverage"; start=$$(date +%s); \
		COVERAGE_FILE=$(COVERAGE_DATA)/.coverage KERAS_BACKEND=$$backend \
			TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m coverage run -m pytest -q -p no:cacheprovider \
			-n 2 --dist loadfile --no-loadscope-reorder --durations=15 || status=1; \
		echo "==> $$backend pass under coverage: $$(( $$(date +%s) - start )) s"; \
	done; \
	COVERAGE_FILE=$(COVERAGE_DATA)/.coverage $(PY) -m coverage combine -q $(COVERAGE_DATA); \
	COVERAGE_FILE=$(COVERAGE_DATA)/.coverage $(PY) -m coverage report --skip-covered; \
	exit $${status:-0}

# Trains CoaT-Lite Tiny on scikit-learn's handwritten digits, exports it as a SavedModel and
# classifies held-out digits through the export.
demo: $(DEMO_STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m training.demo --output-dir demo-output

# Trains a KerasHub RetinaNet to find handwritten digits on generated 128x128 canvases, its
# CoaT-Lite Tiny backbone starting from the digits classifier of `make demo`; prints the held-out
# COCO mAP and where the picture of its detections is (demo-output/detection/detections.png).
demo-detect: demo $(DETECT_STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m training.train --task detection --verbose 2 \
		--output-dir demo-output/detection --init-weights demo-output/last.keras

# keras_coat on TensorFlow, JAX and PyTorch beside timm, each in its own processes: cold start to
# the first prediction phase by phase, steady inference at batch 1 and 8 (on this CPU's ISA and
# capped at AVX2), `fit` speed and peak memory at batch 16, the input pipeline per core. Rewrites
# its sections of benchmarks/RESULTS.md (about 15 minutes on 2 idle cores).
bench: $(TEST_STAMP)
	$(PY) benchmarks/compare.py

# Rewrites the deployment-runtime section of benchmarks/RESULTS.md: timm (eager, torch.compile,
# ONNX Runtime) against keras_coat (TF graph, ONNX Runtime, OpenVINO, LiteRT float and int8).
bench-deploy: $(TEST_STAMP)
	$(PY) benchmarks/deploy.py

clean:
	rm -rf demo-output .pytest_cache .coverage-data
