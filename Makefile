# fvae-ct: `make demo` (main job) and `make test`; both install what they need into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# real data and weights live outside the repository
ifneq ($(wildcard ../shared/assets),)
export FVAE_ASSETS ?= $(abspath ../shared/assets)
endif
export MPLBACKEND := Agg

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fvae recon -o outputs/demo --vae taef2

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_taef2.py --out outputs/bench

clean:
	rm -rf outputs .pytest_cache
