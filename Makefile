# Every target creates (or reuses) the virtual environment in $(VENV) and installs the
# package into it from this checkout, so a fresh clone needs only a Python 3.11+ interpreter.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# Two test workers: the CI machine has 2 cores.
PYTEST_ARGS ?= -n 2
# Each quickstart run gets a fresh directory (pass RUN_DIR=... to resume one instead).
RUN_DIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

.PHONY: quickstart kernel-demo test test-slow benchmark benchmark-window benchmark-decode benchmark-remat benchmark-cross-entropy fit-check length-extrapolation state-capacity memory-retrieval reproduce install clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,hf,eval]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m experiments.train --gin_file=configs/experiments/quickstart.gin --workdir=$(RUN_DIR)

kernel-demo: $(STAMP)
	$(BIN)/python -m experiments.kernel_demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) -m "slow" tests

benchmark: $(STAMP)
	$(BIN)/python -m experiments.benchmark_kernels

# Sliding window vs dense causal, forward + backward, one run; fails if the window is not
# fast enough (CPU: 8K tokens, window 256, time ratio <= 0.2; GPU/TPU: 32K, 1024, <= 1/8).
benchmark-window: $(STAMP)
	$(BIN)/python -m experiments.benchmark_kernels --window-check

# Decode cache bytes and decode tokens/s per mixer and hybrid (tiny models), 1K ... 64K tokens.
# Full-attention configs are timed up to DECODE_MAX_TIMED (quadratic prefill; with 32768 a
# 2-core CPU takes 12-22 min in all; empty: time every length).
DECODE_MAX_TIMED ?= 32768
DECODE_OUT ?= benchmarks/results/decode_cpu.json
benchmark-decode: $(STAMP)
	$(BIN)/python -m experiments.benchmark_decode \
	    $(if $(DECODE_MAX_TIMED),--max_timed_length $(DECODE_MAX_TIMED)) --out $(DECODE_OUT)

# Compiled peak memory of the train step by remat policy, scanned and not (32 layers x 4K
# tokens, compile only; 2-core CPU: ~10 min).
benchmark-remat: $(STAMP)
	$(BIN)/python -m experiments.bench_remat --scan both --json benchmarks/results/remat_cpu.json

# Compiled memory of the full-logits loss vs the chunked cross-entropy (128K vocab x 8K tokens).
benchmark-cross-entropy: $(STAMP)
	$(BIN)/python -m experiments.bench_cross_entropy

# Does a gin config's train step fit a TPU topology? Compile-only through libtpu
# (LCLM_LIBTPU_PATH or `pip install libtpu`): make fit-check GIN=... TOPOLOGY=v5e:4x4
GIN ?= configs/experiments/quickstart.gin
TOPOLOGY ?= v5e:2x2
fit-check: $(STAMP)
	$(BIN)/python -m experiments.fit_check --gin_file=$(GIN) --topology=$(TOPOLOGY)

# Train at length 64 with several position methods, evaluate at 64 ... 1024 (2-core CPU: ~30 min).
length-extrapolation: $(STAMP)
	$(BIN)/python -m experiments.length_extrapolation \
	    --gin_file=configs/experiments/length_extrapolation.gin --workdir=runs/length-extrapolation

# Passkey accuracy of a 2-layer Mamba-2 per state size, trained at 256, evaluated to 2048 (2-core CPU: ~1 h).
state-capacity: $(STAMP)
	$(BIN)/python -m experiments.state_capacity \
	    --gin_file=configs/experiments/stuffed_mamba.gin --workdir=runs/stuffed_mamba

# Small-scale reproductions (CPU-sized defaults; *_tpu.gin for the papers' sizes):
# make reproduce REPRO=zoology_mqar | ruler_length | lra_listops
REPRO ?= zoology_mqar
reproduce: $(STAMP)
	$(BIN)/python -m experiments.reproduce \
	    --gin_file=configs/experiments/repro_$(REPRO).gin --workdir=runs/repro/$(REPRO)

memory-retrieval: $(STAMP)
	$(BIN)/python -m experiments.memory_retrieval \
	    --gin_file=configs/experiments/memory_retrieval.gin --workdir=runs/memory_retrieval

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs

# One command for a GPU or TPU machine with a fresh clone (benchmarks/README.md): installs
# nothing when $(PYTHON)'s jax already sees the accelerator (else `.[gpu]`/`.[tpu]` + `.[test]`
# into ~/.cache/lclm/venv-device), runs the gpu/tpu-marked kernel tests and the kernel
# benchmark against the peers there, writes benchmarks/results/<device>.md, .json and a log,
# within 8 minutes (and copies them to $OUT when set). Not tied to $(STAMP): a lent machine
# may have no network. DEVICE_CHECK_ARGS=--dry-run runs the same flow on CPU at tiny sizes.
DEVICE_CHECK_ARGS ?=
.PHONY: device-check
device-check:
	$(PYTHON) -m experiments.device_check $(DEVICE_CHECK_ARGS)
