# `make demo` runs the product end to end on this machine; `make test` runs every test.
# Both set up what they need first, idempotently, on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WHEEL_CACHE ?= $(HOME)/.cache/gpt2-run/wheels
# Debian packages the tests drive for real: a browser, a container engine, a base-image builder;
# and what compiles llama.cpp once (scripts/llama_wheel.sh).
APT_PACKAGES := chromium podman runc debootstrap fonts-dejavu-core g++ cmake

.PHONY: setup setup-python setup-system setup-gpu test demo bench clean

setup: setup-system setup-python

setup-python: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-train.txt requirements-gpt2simple.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# llama-cpp-python: compiled once into wheels/ (kept; the container test hands it to the image build),
	# and kept in a per-user cache too, so that a fresh clone on the same machine does not compile again.
	mkdir -p wheels $(WHEEL_CACHE) && cp -n $(WHEEL_CACHE)/llama_cpp_python-* wheels/ 2>/dev/null || true
	PIP="$(PY) -m pip" scripts/llama_wheel.sh wheels
	cp wheels/llama_cpp_python-* $(WHEEL_CACHE)/
	$(PY) -m pip install -q --find-links wheels --only-binary llama-cpp-python -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-gpt2simple.txt
	touch $@

# Fine-tuning on an NVIDIA GPU: its own .venv-gpu (TensorFlow 2.15 with CUDA 12.2 wheels, NumPy < 2;
# see requirements-gpu.txt), then .venv-gpu/bin/python -m finetune ... The normal setup stays CPU-only.
setup-gpu: .venv-gpu/.installed

.venv-gpu/.installed: requirements-gpu.txt requirements-gpt2simple.txt
	test -x .venv-gpu/bin/python || $(PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q --upgrade pip
	.venv-gpu/bin/python -m pip install -q -r requirements-gpu.txt
	.venv-gpu/bin/python -m pip install -q --no-deps -r requirements-gpt2simple.txt
	touch $@

setup-system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:" $$missing; \
		SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

test: setup
	$(PY) -m pytest

demo: setup-python
	$(PY) scripts/demo.py

bench: setup-python
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) .pytest_cache
