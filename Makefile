# The two README commands: `make demo` and `make test`. Both set everything up by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SENET := $(VENV)/bin/senet
# CPU wheel by default (found on local disk here). GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
DEMO := demo

.PHONY: install test demo slurm-up slurm-down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# The local Slurm cluster is started for the tests and always stopped again, keeping pytest's status
# (exit 5, no tests collected, fails too).
test: install slurm-up
	$(PY) -m pytest -q tests; status=$$?; $(MAKE) -s slurm-down; exit $$status

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(SENET) make-synthetic $(DEMO)/data --classes 10 --train-per-class 120 --val-per-class 30 --test 100 --imbalance 4 --corrupt 5 --seed 0
	# check-data exits 1 because the demo plants undecodable files on purpose; they go to the exclusion list.
	$(SENET) check-data $(DEMO)/data --cache-dir $(DEMO)/cache --exclude-out $(DEMO)/exclude.txt --json $(DEMO)/check.json || test $$? -eq 1
	@echo "demo results are in $(DEMO)/"

slurm-up:
	slurm/cluster/up.sh

slurm-down:
	slurm/cluster/down.sh

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
