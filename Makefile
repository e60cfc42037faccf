# keras-coat: `make demo` and `make test` create the environment themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-keras-coat
# The oldest Keras keras_coat supports (pyproject.toml), without dependencies (the venv's serve):
# the multi-worker TensorFlow test runs on it as well as on the venv's newest Keras.
OLDEST_KERAS := .venv-keras38

.PHONY: venv test test-fast test-jax test-torch test-train-jax demo demo-detect bench bench-deploy clean

# Everything the tests, the demo and the converter need: TensorFlow, JAX (CPU), the reference
# stack (torch>=2.14, torchvision>=0.29, timm) and the training extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

$(OLDEST_KERAS)/.installed: $(STAMP)
	rm -rf $(OLDEST_KERAS)
	$(PY) -m pip install --quiet --no-deps --target $(OLDEST_KERAS) "keras==3.8.*"
	touch $@

venv: $(STAMP) $(OLDEST_KERAS)/.installed

# Two pytest workers (pytest-xdist), a test file each at a time: CI has 2 cores, and many tests
# wait on subprocesses or I/O while the other worker computes.
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# The whole suite on TensorFlow (slow tests included), then the layer, model, parity and
# serialization tests again on JAX and on PyTorch (and KerasHub's RetinaNet on PyTorch), then
# training.train on the JAX engine. Two slow serialization tests run on TensorFlow only: the
# round trip of all seven variants (the tiny ones cover the other backends) and the import check
# without KerasHub.
BACKEND_TESTS := tests/test_layers.py tests/test_models.py tests/test_parity.py \
	tests/test_serialization.py \
	--deselect tests/test_serialization.py::test_every_variant_saves_and_loads_as_itself \
	--deselect tests/test_serialization.py::test_the_package_works_without_keras_hub

test: $(STAMP) $(OLDEST_KERAS)/.installed
	TF_CPP_MIN_LOG_LEVEL=2 $(PYTEST) --ignore=tests/test_training_jax.py
	$(MAKE) --no-print-directory test-jax
	$(MAKE) --no-print-directory test-torch
	$(MAKE) --no-print-directory test-train-jax

test-jax: $(STAMP)
	KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2 $(PYTEST) $(BACKEND_TESTS)

test-torch: $(STAMP)
	KERAS_BACKEND=torch TF_CPP_MIN_LOG_LEVEL=2 $(PYTEST) $(BACKEND_TESTS) \
		tests/test_hub.py::test_retinanet_on_a_coat_backbone_trains_saves_and_loads

# training.train on the JAX engine: its tf.data pipelines and fault handling under JAX, then one
# device, two host devices and two processes on 127.0.0.1 (same weights), a killed process and
# the resumed rerun, a classifier and a detector stopped by SIGTERM and resumed.
test-train-jax: $(STAMP)
	KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2 $(PYTEST) \
		tests/test_tf_pipeline.py tests/test_faults.py tests/test_training_jax.py

test-fast: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PYTEST) -m "not slow"

# Trains CoaT-Lite Tiny on scikit-learn's handwritten digits, exports it as a SavedModel and
# classifies held-out digits through the export.
demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m training.demo --output-dir demo-output

# Trains a KerasHub RetinaNet to find handwritten digits on generated 128x128 canvases, its
# CoaT-Lite Tiny backbone starting from the digits classifier of `make demo`; prints the held-out
# COCO mAP and where the picture of its detections is (demo-output/detection/detections.png).
demo-detect: demo
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m training.train --task detection --verbose 2 \
		--output-dir demo-output/detection --init-weights demo-output/last.keras

# keras_coat on TensorFlow, JAX and PyTorch beside timm, each in its own processes: cold start to
# the first prediction phase by phase, steady inference at batch 1 and 8 (on this CPU's ISA and
# capped at AVX2), `fit` speed and peak memory at batch 16, the input pipeline per core. Rewrites
# its sections of benchmarks/RESULTS.md (about 15 minutes on 2 idle cores).
bench: $(STAMP)
	$(PY) benchmarks/compare.py

# Rewrites the deployment-runtime section of benchmarks/RESULTS.md: timm (eager, torch.compile,
# ONNX Runtime) against keras_coat (TF graph, ONNX Runtime, OpenVINO, LiteRT float and int8).
bench-deploy: $(STAMP)
	$(PY) benchmarks/deploy.py

clean:
	rm -rf demo-output .pytest_cache
