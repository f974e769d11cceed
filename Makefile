# Two commands do all set-up on a fresh machine (idempotent):
#   make demo   build, then run the main job
#   make test   build, then run the test suite
# Everything lives in .venv (created when missing; it sees an already installed torch).
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test build build-cpu env bench clean

$(VPY):
	$(PY) -m venv --system-site-packages $(VENV)

env: $(VPY)
	$(VPY) -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
	$(VPY) -m pip install -q "torch>=2.4" numpy ninja pybind11 pytest pytest-benchmark hypothesis pyyaml scikit-learn matplotlib torchvision transformers

# The extension: CUDA when torch has CUDA and nvcc is found, else C++ only (FASTBIG_CPU_ONLY=1 forces it).
build: env
	flock /tmp/fastbig-build.lock $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	$(VPY) -m fastbig info

# Fast C++-only rebuild for development (incremental, serialized by a lock).
build-cpu:
	FASTBIG_CPU_ONLY=1 flock /tmp/fastbig-build.lock $(PY) setup.py -q build_ext --inplace

demo: build
	$(VPY) -m fastbig demo

test: build
	bash tools/run_tests.sh $(VPY) $(PYTEST_ARGS)

bench: build
	$(VPY) -m fastbig bench --quick

clean:
	rm -rf build dist *.egg-info fastbig/_C*.so
