# The two README commands: `make demo` and `make test`. Both set everything up by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SENET := $(VENV)/bin/senet
# CUDA= (empty): a machine without a GPU: torch's CPU wheel and the CUDA 12 DALI, which runs CPU pipelines too.
# CUDA=12 / CUDA=13: torch's and DALI's builds for that CUDA major, together (README: GPU machines).
# One DALI per environment: nvidia-dali-cuda120 and -cuda130 write the same nvidia/dali/ files, so the other
# flavour is uninstalled before this one is installed.
CUDA ?=
ifeq ($(CUDA),)
TORCH_SPEC ?= torch==2.13.0
DALI_EXTRA := cuda12
else ifeq ($(CUDA),12)
TORCH_SPEC ?= torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
DALI_EXTRA := cuda12
else ifeq ($(CUDA),13)
TORCH_SPEC ?= torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130
DALI_EXTRA := cuda13
else
$(error CUDA=$(CUDA): use CUDA=12 or CUDA=13 for a GPU machine, or leave it empty for a CPU-only one)
endif
DALI_OTHER := $(if $(filter cuda12,$(DALI_EXTRA)),nvidia-dali-cuda130,nvidia-dali-cuda120)
DEMO := demo

.PHONY: install test demo slurm-up slurm-down gpu-check clean

# One stamp per flavour: `make install CUDA=13` after a CPU install reinstalls.
STAMP := $(VENV)/.installed-$(if $(CUDA),cuda$(CUDA),cpu)
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip uninstall -q -y $(DALI_OTHER) 2>/dev/null || true
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,tensorboard,$(DALI_EXTRA)]'
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
# interpreter with torch, DALI, numpy, pillow, scipy, pyyaml and pytest. QUICK=1: the profile for a short
# window (a borrowed node); DEVICE=cpu: the same with small sizes. SECTIONS=input,train reruns a few sections
# and keeps the others' results; TIMEOUTS=train=900 gives a section more time.
DEVICE ?= gpu
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	DEVICE=$(DEVICE) QUICK=$(QUICK) GPU_CHECK_OUT=$(GPU_CHECK_OUT) SECTIONS=$(SECTIONS) TIMEOUTS=$(TIMEOUTS) \
	  PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/gpu_check.py

slurm-up:
	slurm/cluster/up.sh

slurm-down:
	slurm/cluster/down.sh

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
