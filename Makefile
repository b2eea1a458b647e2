# Every target creates .venv itself when it is missing (Python 3.11, pinned torch).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SCALE  ?= paper
ARGS   ?=
# Test workers (pytest-xdist): one per core, each test single-threaded; JOBS=0 runs the suite in-process.
JOBS   ?= $(shell nproc 2>/dev/null || echo 1)

.PHONY: venv test test-fast test-without-shared train reproduce figures bench bench-fused bench-dist gpu-check gpu-evidence clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)  ## the whole suite, CPU only, no network, one worker per core
	$(PY) -m pytest tests -n $(JOBS)

test-fast: $(STAMP)  ## skip the end-to-end runs
	$(PY) -m pytest tests -n $(JOBS) -m "not slow"

test-without-shared: $(STAMP)  ## the data-dependent tests again, as on a clone without ../shared
	empty=$$(mktemp -d) && GAF_OFFLINE_DATA=$$empty $(PY) -m pytest tests -n $(JOBS) -m data_sources; \
	status=$$?; rmdir $$empty; exit $$status

train: $(STAMP)  ## a short real GAF run on the CIFAR-10 JPEG copy, on CPU
	$(PY) experiments/train.py experiment=smoke $(ARGS)

reproduce: $(STAMP)  ## every figure preset at SCALE (tiny|small|paper), then collect and plot
	$(PY) scripts/reproduce.py --scale $(SCALE) $(ARGS)

figures: $(STAMP)  ## collect run directories into results/ and redraw every figure and the table
	$(PY) scripts/collect.py
	$(PY) scripts/plot.py

bench: $(STAMP)  ## single-device benchmark (ARGS="--device cpu --quick" on a CPU)
	$(PY) scripts/bench.py $(ARGS)

bench-fused: $(STAMP)  ## K runs as processes, in turn, and as one fused group (ARGS="--device cpu --quick" on a CPU)
	$(PY) scripts/bench_fused.py $(ARGS)

bench-dist: $(STAMP)  ## bytes and time of the multi-rank reductions (ARGS=--quick for seconds)
	$(PY) scripts/bench_dist.py $(ARGS)

gpu-check: $(STAMP)  ## every CUDA path checked in minutes: results/gpu/<date>-<card>.md (ARGS="--device cpu --quick" dry run)
	$(PY) scripts/gpu_check.py $(ARGS)

# On a lent device (its own python3, no network, no .venv) this runs as it is, and writes into
# $(OUT)/gpu_small where the device tool sets OUT; here it uses .venv.
gpu-evidence:  ## experiment=gpu_small on one GPU, continued call after call: results/gpu_small/ (ARGS="--device cpu --quick" dry run)
	$(if $(wildcard $(STAMP)),$(PY),python3) scripts/gpu_evidence.py $(if $(OUT),--results $(OUT)) $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
