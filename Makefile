# Two commands for a newcomer:  `make demo` (set up + run the main job)  and  `make test` (set up + run the tests).
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
EXTRAS  ?= dev,eval,train,deepspeed

.PHONY: setup test test-gpu gpu-check demo bench clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so nothing else drags in a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints-cpu.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# On a CUDA machine: compiled kernels in bf16/fp16/fp32 and FlexAttention (no interpreter).
test-gpu: $(VENV)/.installed
	env -u TRITON_INTERPRET $(PY) -m pytest -q -ra tests/test_kernels_cuda.py tests/test_flex_backend.py

# One-shot GPU check (<= 8 min, pinned configs, the machine's own torch / triton): parity, registers, quick bench.
# Results stream to $(OUT)/gpu_check.jsonl. Uses $(PYTHON) from PATH (the machine's own packages; no venv, no installs).
OUT ?= bench/out/gpu_check
gpu-check:
	env -u TRITON_INTERPRET $(PYTHON) bench/gpu_check.py --out-dir $(OUT)

demo: $(VENV)/.installed
	$(VENV)/bin/attn-mod demo --out runs/demo

bench: $(VENV)/.installed
	$(PY) bench/capture_memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
