# The two README commands: `make serve` and `make test`. Both set up the venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the torch file on disk / CPU build; GPU machines may set TORCH_SPEC to a CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= server,train,quant,dicom,dev
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup serve test lint demo-model clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@! $(PY) -c "import torchvision" 2>/dev/null || { echo "torchvision is installed: it breaks transformers' processors here (see ENVIRONMENT)"; exit 1; }
	touch $@

serve: setup
	$(VENV)/bin/tinyllava-med serve

lint: setup
	$(VENV)/bin/ruff check tinyllava_med tests bench
	$(VENV)/bin/ruff format --check tinyllava_med tests bench
	$(VENV)/bin/mypy tinyllava_med

test: lint
	$(PY) -m pytest -q -ra

demo-model: setup
	$(VENV)/bin/tinyllava-med demo-model

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
