# Two commands do all set-up on a fresh machine:
#   make demo   - sandbox vendors, ingest service, event simulator and `dagster dev`
#   make test   - the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME ?= $(abspath .dagster_home)

.PHONY: demo test bench bench-full install clean

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m personalization_pipeline.demo

test: install
	@mkdir -p $(DAGSTER_HOME) && cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m pytest personalization_pipeline_tests -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.run --size small

bench-full: install
	$(PY) -m bench.run --size full

clean:
	rm -rf .demo .dagster_home .pp_data
