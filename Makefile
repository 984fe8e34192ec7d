# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hibari-installed
PYTEST_ARGS ?=

.PHONY: test demo install clean bench

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: any other version pulls several GB of CUDA builds
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/hibari demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PIP) install -q -e ".[bench]"
	@echo "benchmarks: see bench/README.md"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
