# MirrorUnit: `make run` starts the demo, `make test` runs every test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-system.sh
	scripts/setup-system.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==24.3.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: setup
	$(PY) -m firmware.demo

# pytest exits 5 when it collected nothing; that is a broken test tree, not a pass.
test: setup
	$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$rc

lint: setup
	$(VENV)/bin/ruff check firmware tests
	$(VENV)/bin/mypy firmware

bench: setup
	$(PY) -m firmware.bench

clean:
	rm -rf var .pytest_cache
