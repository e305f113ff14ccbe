# `make demo` runs the product end to end on this machine; `make test` runs every test.
# Both set up what they need first, idempotently, on a fresh Debian machine: the demo only what it
# needs (a compiler for llama.cpp, the packages of requirements-demo.txt); the tests everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WHEEL_CACHE ?= $(HOME)/.cache/gpt2-run/wheels
# Debian packages. The demo's: what compiles llama.cpp once (scripts/llama_wheel.sh) and makes the venv.
# The tests' on top: a browser, a container engine, a base-image builder.
DEMO_APT := g++ cmake python3-venv
TEST_APT := $(DEMO_APT) chromium podman runc debootstrap fonts-dejavu-core

.PHONY: setup setup-demo setup-python setup-system setup-system-demo setup-gpu test demo bench clean

setup: setup-system setup-python

# what the demo needs, and no more
setup-demo: setup-system-demo $(VENV)/.demo-installed

setup-python: $(VENV)/.installed

# The Debian packages in $(1) that are missing, installed (with sudo unless root).
define apt
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:" $$missing; \
		SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
endef

setup-system-demo:
	$(call apt,$(DEMO_APT))

setup-system:
	$(call apt,$(TEST_APT))

# The venv with the packages of the requirements file $(1), llama-cpp-python from a wheel:
# compiled once into wheels/ (kept; the container test hands it to the image build), and kept in a
# per-user cache too, so that a fresh clone on the same machine does not compile again.
define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	mkdir -p wheels $(WHEEL_CACHE) && cp -n $(WHEEL_CACHE)/llama_cpp_python-* wheels/ 2>/dev/null || true
	PIP="$(PY) -m pip" scripts/llama_wheel.sh wheels
	cp wheels/llama_cpp_python-* $(WHEEL_CACHE)/
	$(PY) -m pip install -q --find-links wheels --only-binary llama-cpp-python -r $(1)
	$(PY) -m pip install -q --no-deps -r requirements-gpt2simple.txt
endef

DEMO_REQUIREMENTS := requirements.txt requirements-train.txt requirements-gpt2simple.txt requirements-demo.txt

$(VENV)/.demo-installed: $(DEMO_REQUIREMENTS)
	$(call install,requirements-demo.txt)
	touch $@

# requirements-dev.txt includes the demo's, so the full set-up satisfies the demo's too
$(VENV)/.installed: $(DEMO_REQUIREMENTS) requirements-dev.txt
	$(call install,requirements-dev.txt)
	touch $(VENV)/.demo-installed $@

# Fine-tuning on an NVIDIA GPU: its own .venv-gpu (TensorFlow 2.15 with CUDA 12.2 wheels, NumPy < 2;
# see requirements-gpu.txt), then .venv-gpu/bin/python -m finetune ... The normal setup stays CPU-only.
# TensorFlow 2.15 has wheels for Python 3.9-3.11 only: GPU_PYTHON is a Python 3.11, checked first.
GPU_PYTHON ?= python3.11
setup-gpu: .venv-gpu/.installed

.venv-gpu/.installed: requirements-gpu.txt requirements-gpt2simple.txt
	@$(GPU_PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { echo \
		"make setup-gpu needs Python 3.11 (TensorFlow 2.15): '$(GPU_PYTHON)' is not; install it or give GPU_PYTHON=/path/to/python3.11" >&2; \
		exit 1; }
	test -x .venv-gpu/bin/python || $(GPU_PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q --upgrade pip
	.venv-gpu/bin/python -m pip install -q -r requirements-gpu.txt
	.venv-gpu/bin/python -m pip install -q --no-deps -r requirements-gpt2simple.txt
	touch $@

test: setup
	$(PY) -m pytest

# The demo ends with Ctrl-C, which stops the server: it exits 0 then, so make reports no error.
demo: setup-demo
	$(PY) scripts/demo.py

bench: setup-python
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) .pytest_cache
