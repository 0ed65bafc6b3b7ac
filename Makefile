# `make train` and `make test` set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup train test test-fast bench clean constraints

setup: $(STAMP)

# The versions in constraints.txt are the ones the tests passed with (the local package itself is not pinned).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $(STAMP)

train: $(STAMP)
	$(PY) runner/train.py --config digits

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not slurm" tests

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]" -c constraints.txt
	touch $(BENCH_STAMP)

# About 3 minutes: every case in 3 interleaved rounds; `python -m benchmarks.bench --help` for options.
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.bench --json runs/bench.json

# The direct and test dependencies of pyproject.toml, pinned to what this .venv holds (run after `make test`).
PINNED := accelerate|matplotlib|mlflow|psutil|pytest|pytest-timeout|pyyaml|safetensors|scikit-learn|tensorboard|timm|torch|torchmetrics|torchvision|tqdm|wandb

constraints: $(STAMP)
	{ grep '^#' constraints.txt; $(PY) -m pip freeze | grep -iE '^($(PINNED))=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf runs
