# deltalign — every target that needs the environment builds it first (.venv from pyproject.toml).
# Pass-through variables: CONFIG (YAML), RUN (run directory), SET ("sft.lr=1e-4 dpo.beta=0.2").
SHELL := /bin/bash
PY      := .venv/bin/python
STAMP   := .venv/.installed
MODEL   := models/SmolLM2-135M-Instruct/.complete
CONFIG  ?= configs/default.yaml
RUN     ?=
SET     ?=
# Multi-process: ACCELERATE=configs/accelerate/zero3.yaml NPROC=2 launches the stages with `accelerate launch`.
ACCELERATE ?=
NPROC   ?=
LAUNCH   = $(if $(ACCELERATE)$(NPROC),.venv/bin/accelerate launch $(if $(ACCELERATE),--config_file $(ACCELERATE)) \
           $(if $(NPROC),--num_processes $(NPROC)) -m deltalign,$(PY) -m deltalign)
ARGS     = --config $(CONFIG) $(if $(RUN),--run-dir $(RUN)) $(foreach s,$(SET),--set $(s))
STAGES  := sft rm dpo kto ppo grpo compose

.PHONY: install model test faults eval export demo docs doctor status compose-demo methods bench-scale help $(STAGES)

help:
	@echo "make install | model | test | faults | demo | doctor | status | $(STAGES) | eval | export | docs | bench | methods"
	@echo "   (CONFIG=... RUN=... SET='k=v ...')"
	@echo "look at a policy: $(PY) -m deltalign generate --from {base,sft,dpo,ppo,grpo,export,DIR} --prompt 'TEXT' [--run-dir RUN]"

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	touch $@

model: $(MODEL)

$(MODEL): | $(STAMP)
	$(PY) -m deltalign.model.default_model

test: $(STAMP) $(MODEL)
	$(PY) -m pytest

# Fault injection, every point: a crash (os._exit) at each write and rename a run directory sees, then `run` again
# must give the uninterrupted result bit for bit (`make test` runs a sample of the points). Tiny model, CPU.
faults: $(STAMP)
	DELTALIGN_FAULTS=all $(PY) -m pytest tests/test_faults.py -q

# One target per stage; `make sft rm dpo` runs them in order, each skipping if already up to date.
$(STAGES): $(STAMP) $(MODEL)
	$(LAUNCH) run $@ $(ARGS)

# Check the environment, the model directory and every data source of the config before a long run.
doctor: $(STAMP) $(MODEL)
	$(PY) -m deltalign doctor $(ARGS)

# What `make STAGE` would do: each stage done (wall time, peak memory), stale, unfinished or missing.
status: $(STAMP)
	$(PY) -m deltalign status $(ARGS)

# Held-out comparison of base / sft / dpo (those that ran), with reward-model scores when an rm run exists;
# also writes <run>/plots/<stage>.png training curves.
eval: $(STAMP) $(MODEL)
	$(PY) -m deltalign eval $(ARGS)

# The whole job on the embedded default, then the held-out table and where the exported model is.
DEMO_ARGS = --config $(if $(filter command line,$(origin CONFIG)),$(CONFIG),configs/demo.yaml) \
            $(if $(RUN),--run-dir $(RUN)) $(foreach s,$(SET),--set $(s))
demo: $(STAMP) $(MODEL)
	@start=$$(date +%s); \
	$(PY) -m deltalign run sft rm dpo export $(DEMO_ARGS) && \
	$(PY) -m deltalign eval $(DEMO_ARGS) && \
	$(PY) docs/refresh.py --record-demo $(or $(RUN),runs/demo) --wall $$(( $$(date +%s) - start ))

# Two DPO deltas on disjoint constraint families, composed (cat, task arithmetic, learned gates), scored on both.
compose-demo: $(STAMP) $(MODEL)
	$(PY) bench/compose_demo.py $(if $(filter 1 yes true,$(QUICK)),--quick)

# Every delta method through SFT then DPO on the embedded default at one budget (bench/methods.py), each stage a
# fresh process. Results: bench/results/methods-<date>-<time>[-quick].md/.json
methods: $(STAMP) $(MODEL)
	$(PY) bench/methods.py $(if $(filter 1 yes true,$(QUICK)),--quick)

# Memory per process under ZeRO on a random ~1B Llama built locally (bench/scale.py): one process, ZeRO-2 x 2,
# ZeRO-3 x 2, ZeRO-3 + CPU offload x 2; SFT then DPO, 2 steps each (~25 min here; QUICK=1: a ~0.23B model).
bench-scale: $(STAMP) $(MODEL)
	$(PY) bench/scale.py $(if $(filter 1 yes true,$(QUICK)),--quick)

# Rewrite the figures in README.md and docs/*.md from the result files (docs/results/, bench/results/);
# DEMO=runs/demo first copies that run's record (written by `make demo`) into docs/results/.
docs:
	$(PY) docs/refresh.py $(if $(DEMO),--publish $(DEMO))

# Merge the most recently finished policy (of ppo, grpo, dpo; else sft; SET=export.policy=sft to choose) and the reward model
# into standalone HF model directories in <run>/export/ (re-exports when a stage changed). Then try it:
#   python -m deltalign generate --from export --prompt "..." [--run-dir RUN]
export: $(STAMP) $(MODEL)
	$(PY) -m deltalign export $(ARGS)

# Benchmark against TRL (bench/): TRL lives only in .bench-venv, built from bench/requirements.txt, never in
# deltalign's dependencies. `make bench` = medians of 3 alternating fresh runs per side; `make bench QUICK=1` =
# one run each, fewer steps (development). Results: bench/results/<date>-<time>[-quick].md and .json.
# WORKLOAD=embedded|hh|0.5b (bench/common.py WORKLOADS): hh / 0.5b write bench/results/<workload>-<date>-<time>*.
QUICK       ?=
WORKLOAD    ?= embedded
BENCH_STAMP := .bench-venv/.installed

.PHONY: bench

$(BENCH_STAMP): bench/requirements.txt
	python3 -m venv .bench-venv
	.bench-venv/bin/python -m pip install -q --upgrade pip
	.bench-venv/bin/python -m pip install -q torch==2.13.0
	.bench-venv/bin/python -m pip install -q -r bench/requirements.txt
	touch $@

bench: $(STAMP) $(MODEL) $(BENCH_STAMP)
	$(PY) bench/run.py --workload $(WORKLOAD) $(if $(filter 1 yes true,$(QUICK)),--quick)
