# Two commands do everything: `make engine` (build + verify a bundle) and `make test`.
MODEL ?= tiny
CHECKPOINT ?=
OUT ?= build/$(MODEL)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: engine test bench loadtest setup clean

setup: $(STAMP)

# torch first, pinned, so pip takes the CPU wheel on disk instead of pulling a CUDA build
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[build,serve,test]'
	touch $(STAMP)

engine: $(STAMP)
	$(BIN)/llama4-deploy build --recipe $(MODEL) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) --out $(OUT)
	$(BIN)/llama4-deploy verify $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# ONNX Runtime vs transformers eager, side by side, per MoE dispatch (several minutes)
bench: $(STAMP)
	$(BIN)/python -m llama4_deploy.bench

# `llama4-deploy serve` under 1, 4, 8 and 16 concurrent clients on loopback (scout-mini by default)
LOADTEST_MODEL ?= scout-mini
loadtest: $(STAMP)
	test -f build/$(LOADTEST_MODEL)/manifest.json || $(BIN)/llama4-deploy build --recipe $(LOADTEST_MODEL) --out build/$(LOADTEST_MODEL)
	$(BIN)/python -m llama4_deploy.loadtest --bundle build/$(LOADTEST_MODEL)

clean:
	rm -rf build
