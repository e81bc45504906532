# Two commands do everything: `make engine` (build + verify a bundle) and `make test`.
MODEL ?= tiny-trained
PRECISION ?=
CHECKPOINT ?=
OUT ?= build/$(MODEL)$(if $(PRECISION),-$(PRECISION))
# the trained checkpoint writes words: make engine shows a sample of them (seeded nucleus sampling: greedy
# decoding loops on this corpus; no trailing space in the prompt: see docs/training.md)
PROMPT ?= $(if $(filter tiny-trained,$(MODEL)),The list of)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TRAIN_STAMP := $(VENV)/.installed-train

.PHONY: engine test bench loadtest setup clean train-tiny train-passkey plan synth-checkpoint bench-build bench-kernels gpu-check quant-report bench-peers

setup: $(STAMP)

# torch first, pinned, so pip takes the CPU wheel on disk instead of pulling a CUDA build
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[build,serve,test,eval]'
	# the tests' image-preprocessing reference (transformers' Llama4ImageProcessor runs on torchvision): kept out of
	# site-packages, since this torchvision's compiled ops do not load beside the CPU torch and transformers would
	# then fail to import; tests/vision_reference.py runs it in a subprocess (see its docstring)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --target $(VENV)/reference torchvision==0.28.0
	touch $(STAMP)

engine: $(STAMP)
	$(BIN)/llama4-deploy build --recipe $(MODEL) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(PRECISION),--precision $(PRECISION)) --out $(OUT)
	$(BIN)/llama4-deploy verify $(OUT)
	$(if $(PROMPT),$(BIN)/llama4-deploy run $(OUT) --prompt "$(PROMPT)" --max-new-tokens 40 --temperature 0.7 --top-p 0.9 --seed 0)

# deployment tables from the config alone (no weights): parameters, bytes per precision, GPUs, context, stages
plan: $(STAMP)
	$(BIN)/llama4-deploy plan $(if $(CHECKPOINT),$(CHECKPOINT),$(MODEL))

# ruff first (lint and format, configured in pyproject.toml): seconds, and a style slip fails before the suite runs
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

# ONNX Runtime vs transformers eager, side by side, per MoE dispatch; then decode/prefill at the
# real chunk size (8192) against chunk 64 and the previous cache layout (several minutes)
bench: $(STAMP)
	$(BIN)/python -m tools.bench
	$(BIN)/python -m tools.bench_context
	$(BIN)/python -m tools.bench_images

# One decode linear (M = 1) at the real models' shapes and the minis': fp32 MatMul vs 4-bit MatMulNBits with float
# and int8 activations, cache-resident and streamed from DRAM: the ceiling the kernels put on a 4-bit decode (minutes)
bench-kernels: $(STAMP)
	$(BIN)/python -m tools.bench_kernels

# Ours against llama.cpp on one scout-shaped checkpoint the bench writes (tools/bench_peers.py): llama-cpp-python
# built from its source release into its own venv, build/peers/venv (the `peers` extra's pin; ~15 minutes once, never
# part of make test; its multimodal library is not built); llama.cpp's own converter and quantizer make f32, Q8_0, Q4_0 and Q4_K_M. QUICK=1: a smoke run
PEERS := build/peers
LLAMA_CPP_PYTHON := 0.3.36
PEERS_SRC := $(PEERS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)
PEERS_STAMP := $(PEERS)/venv/.installed-$(LLAMA_CPP_PYTHON)
$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS)/venv
	$(PEERS)/venv/bin/pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(PEERS)
	tar xzf $(PEERS_SRC).tar.gz -C $(PEERS)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 $(PEERS)/venv/bin/pip install --quiet --disable-pip-version-check $(PEERS_SRC)
	touch $@

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python -m tools.bench_peers --llama-cpp $(PEERS_SRC)/vendor/llama.cpp --peers-python $(PEERS)/venv/bin/python $(if $(QUICK),--quick)

# One table per recipe x precision x form: quality vs transformers fp32 and parity vs the fake-quant simulation
# (verify's figures), bundle size vs fp32, decode b1 vs the fp32 engine timed alternately (10-20 minutes on 2 cores)
quant-report: $(STAMP)
	nice -n 5 $(BIN)/python -m tools.quant_report

# A Maverick-shaped checkpoint (48 layers, 128 experts every second layer, hidden 512) of seeded random bf16
# weights, 4.46 GB of sharded safetensors written shard by shard, into build/synth-maverick (SYNTH_OUT=...)
SYNTH_OUT ?= build/synth-maverick
synth-checkpoint: $(STAMP)
	$(BIN)/python -m tools.synth --out $(SYNTH_OUT)

# Builds it at fp32 and int4 and prints peak anonymous memory (RssAnon) against the largest layer, checkpoint
# read MB/s and seconds per stage (several minutes; needs ~15 GB of disk under build/)
bench-build: synth-checkpoint
	nice -n 5 $(BIN)/python -m tools.bench_build --checkpoint $(SYNTH_OUT) --out build/bench-build

# Reproduce checkpoints/tiny-trained from scratch: corpus from Debian's python3.11-doc, tokenizer,
# training (a fixed token budget), model card figures in build/train-tiny/train.log. Not part of make test.
$(TRAIN_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[build,test,eval,train]'
	touch $(TRAIN_STAMP)

train-tiny: $(TRAIN_STAMP)
	$(BIN)/python -m tools.train

# Reproduce checkpoints/tiny-passkey: tiny-trained fine-tuned on synthetic passkey documents and documentation
# (a curriculum of 144- then 256-token rows, 1600 steps, 1 thread), then built at 2048 tokens with temperature tuning
# on and off and swept by eval --needle; heatmaps, model card, loss curve and log beside the weights
# (docs/training.md; ~20 min). Not part of make test.
train-passkey: $(TRAIN_STAMP)
	nice -n 5 $(BIN)/python -m tools.train_passkey

# `llama4-deploy serve` under 1, 4, 8 and 16 concurrent clients on loopback (scout-mini by default)
LOADTEST_MODEL ?= scout-mini
loadtest: $(STAMP)
	test -f build/$(LOADTEST_MODEL)/manifest.json || $(BIN)/llama4-deploy build --recipe $(LOADTEST_MODEL) --out build/$(LOADTEST_MODEL)
	$(BIN)/python -m tools.loadtest --bundle build/$(LOADTEST_MODEL)

# On a machine with an NVIDIA GPU and TensorRT (pip install tensorrt cuda-python): TensorRT-form bundles of tiny and
# maverick-mini at bf16/fp8/int4, compiled, compared with CPU reference logits, tokens/s and HBM bandwidth fraction;
# one log in build/gpu-check/gpu-check.log. Without TensorRT it says so and exits 2.
gpu-check: $(STAMP)
	$(BIN)/python -m tools.gpu_check --work build/gpu-check

clean:
	rm -rf build
