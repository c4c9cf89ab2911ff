# deltalign — every target that needs the environment builds it first (.venv from pyproject.toml).
# Pass-through variables: CONFIG (YAML), RUN (run directory), SET ("sft.lr=1e-4 dpo.beta=0.2").
SHELL := /bin/bash
PY      := .venv/bin/python
STAMP   := .venv/.installed
MODEL   := models/SmolLM2-135M-Instruct/.complete
CONFIG  ?= configs/default.yaml
RUN     ?=
SET     ?=
ARGS     = --config $(CONFIG) $(if $(RUN),--run-dir $(RUN)) $(foreach s,$(SET),--set $(s))
STAGES  := sft rm dpo

.PHONY: install model test eval help $(STAGES)

help:
	@echo "make install | model | test | $(STAGES)   (CONFIG=... RUN=... SET='k=v ...')"

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
	$(PY) -m deltalign.default_model

test: $(STAMP) $(MODEL)
	$(PY) -m pytest

# One target per stage; `make sft rm dpo` runs them in order, each skipping if already up to date.
$(STAGES): $(STAMP) $(MODEL)
	$(PY) -m deltalign run $@ $(ARGS)

# Held-out comparison of base / sft / dpo (those that ran), with reward-model scores when an rm run exists.
eval: $(STAMP) $(MODEL)
	$(PY) -m deltalign eval $(ARGS)
