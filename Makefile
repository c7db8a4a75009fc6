# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch's CPU wheel where there is no GPU; on a machine whose default index serves CUDA builds,
# point pip at a CPU index, e.g. make demo TORCH_PIP_ARGS="--index-url <your CPU wheel index>".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/pathalign_ray/torch_extensions

export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR
export PYTHONUNBUFFERED := 1
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifneq ($(HAS_GPU),yes)
export DS_ACCELERATOR := cpu
endif

.PHONY: demo test lint install browser bench clean

# DEMO_CONFIG=configs/demo_pretrain.yaml pretrains the generator first; DEMO_ARGS takes key.sub=value overrides
DEMO_CONFIG ?= configs/demo.yaml
DEMO_ARGS ?=
demo: $(VENV)/.deepspeed-ops
	$(PY) jobs/demo.py --config $(DEMO_CONFIG) $(DEMO_ARGS)

test: $(VENV)/.deepspeed-ops browser lint
	$(PY) -m pytest

# ruff is pinned in the dev extra; `ruff format .` and `ruff check --fix .` repair most of what this reports
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Debian's chromium drives the labelling page's browser test (apt needs root; otherwise that test is skipped).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed: the browser test will be skipped"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install --quiet $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e '.[dev,tune,lora]'
	touch $@

# DeepSpeed compiles its shared-memory communication op on first use (35-50 s); do it once, here.
$(VENV)/.deepspeed-ops: $(VENV)/.installed
	$(PY) -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()" 2>&1 | tail -n 1
	touch $@

bench: $(VENV)/.deepspeed-ops
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs .pytest_cache
