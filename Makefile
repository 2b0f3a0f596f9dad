# trafficvlm — the two commands: `make demo` and `make test`. Both run `make setup` first.
#
#   make setup   create/refresh .venv and install the project (fast when nothing changed)
#   make demo    the whole pipeline locally on the embedded default (tiny model, synthetic WTS)
#   make test    the CPU test suite, offline
#   make compile write pipelines/compiled/trafficvlm.yaml (the file users upload in the Kubeflow UI)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp names a hash of everything that decides the install, so edits re-install and nothing else does.
HASH   := $(shell cat pyproject.toml .ci/tools.sh 2>/dev/null | sha1sum | cut -c1-12)
STAMP  := $(VENV)/.installed-$(HASH)

.PHONY: setup demo test compile clean
setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing trafficvlm into $(VENV) (first run takes a few minutes)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@bash .ci/tools.sh
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(VENV)/bin/trafficvlm demo --out runs/demo

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 tests

compile: setup
	$(VENV)/bin/trafficvlm pipeline compile

clean:
	rm -rf $(VENV) .cache runs
