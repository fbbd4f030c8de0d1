# One command each: `make test` (set up + run the tests), `make demo` (set up + run the demo).
# The virtual environment lives in .venv; torch/torchvision are pinned to the builds this
# machine kind serves from its disk (a CUDA build that also runs on the CPU).
PY ?= python3
VENV ?= .venv
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.vitlens-installed

.PHONY: setup test demo clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH_PINS)
	$(VENV)/bin/python -m pip install -q -e '.[test,clip,hf,s3]'
	touch $(STAMP)

setup: $(STAMP)

# The tests run under a fresh empty HOME (set for pytest only; set-up above keeps the
# machine's HOME, e.g. ~/.config/pip), so nothing an earlier run left in ~ (a Ray token
# in ~/.ray, caches) can make them pass.
test: $(STAMP)
	HOME=$$(mktemp -d) $(VENV)/bin/python -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/vitlens demo --out demo-out

clean:
	rm -rf $(VENV) demo-out
