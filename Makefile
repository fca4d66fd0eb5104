# The two README commands: `make demo` and `make test`. Both set everything up by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SENET := $(VENV)/bin/senet
# CPU wheel by default (found on local disk here). GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
DEMO := demo

.PHONY: install test demo slurm-up slurm-down gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,tensorboard]'
	@# The reference SENets for tests/test_weights.py, without its dependencies (they would pull torchvision
	@# and another torch); without it those tests are skipped, saying why.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps pretrainedmodels \
	  || echo "pretrainedmodels could not be installed: the weight-equivalence tests will be skipped"
	touch $@

# The local Slurm cluster is started for the tests and always stopped again, keeping pytest's status
# (exit 5, no tests collected, fails too).
test: install slurm-up
	$(PY) -m pytest -q tests; status=$$?; $(MAKE) -s slurm-down; exit $$status

# The whole story on synthetic data, CPU only, about 5 minutes; everything lands in demo/ (REPORT.md first).
DATA := $(DEMO)/data
KIT := $(DATA)/ILSVRC2012_devkit_t12
demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(SENET) make-synthetic $(DATA) --classes 10 --train-per-class 120 --val-per-class 30 --test 100 --imbalance 4 --corrupt 5 --seed 0 --quiet
	@# check-data exits 1: the demo plants undecodable files on purpose; they go to the exclusion list.
	$(SENET) check-data $(DATA) --cache-dir $(DEMO)/cache --exclude-out $(DEMO)/exclude.txt --json $(DEMO)/check.json --quiet || test $$? -eq 1
	$(SENET) preview-augment $(DATA) --out $(DEMO)/augment.png --crop-size 64 --cache-dir $(DEMO)/cache
	$(SENET) train configs/demo.yaml --nproc 2 --out $(DEMO)/run
	$(SENET) predict $(DEMO)/run/checkpoints/best.pt $(DATA)/val --devkit $(KIT) --out $(DEMO)/val_predictions.txt --cache-dir $(DEMO)/cache
	$(SENET) evaluate $(DEMO)/val_predictions.txt --ground-truth $(KIT)/data/ILSVRC2012_validation_ground_truth.txt --devkit $(KIT) --json $(DEMO)/val_score.json
	$(SENET) predict $(DEMO)/run/checkpoints/best.pt $(DATA)/test --devkit $(KIT) --out $(DEMO)/submission.txt --cache-dir $(DEMO)/cache
	$(SENET) bench-input $(DATA) --threads 2 --py-workers 1 --batch-size 32 --batches 40 --baseline --cache-dir $(DEMO)/cache --json $(DEMO)/bench.json --plot $(DEMO)/bench.png
	$(MAKE) -s slurm-up
	@# The local run again as a Slurm job (2 nodes x 1 task), preempted mid-run by the urgent partition:
	@# it must resume and end bit-identical to demo/run (demo/resume.json).
	. .slurm-local/env && $(SENET) demo-preemption configs/demo.yaml --reference $(DEMO)/run --out $(DEMO) \
	  && job=$$($(PY) -c "import json; print(json.load(open('$(DEMO)/slurm.json'))['job_id'])") \
	  && $(SENET) logs $$job > $(DEMO)/slurm_rank0.log; status=$$?; $(MAKE) -s slurm-down; exit $$status
	$(SENET) report $(DEMO)
	@echo "demo results are in $(DEMO)/ - start with $(DEMO)/REPORT.md"

# The GPU path end to end on this machine (benchmarks/gpu_check.py): no install, no network; PYTHON is any
# interpreter with torch, DALI, numpy, pillow, scipy, pyyaml and pytest. DEVICE=cpu: the same with small sizes.
# SECTIONS=input,train reruns a few sections and keeps the others' results.
DEVICE ?= gpu
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	DEVICE=$(DEVICE) GPU_CHECK_OUT=$(GPU_CHECK_OUT) SECTIONS=$(SECTIONS) PYTHONPATH=$(CURDIR) $(PYTHON) benchmarks/gpu_check.py

slurm-up:
	slurm/cluster/up.sh

slurm-down:
	slurm/cluster/down.sh

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
