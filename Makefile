# `make demo` runs the four notebooks on the embedded default; `make test` runs the tests.
# Both create .venv and install sdnb into it from this repo's own files when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdnb-installed

.PHONY: demo test bench install clean

demo: $(STAMP)
	$(PY) -m sdnb.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

install: $(STAMP)

# torch and torchvision are installed first, as a matched pair; sdnb's lower bounds then keep them.
$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[offline,dev]'
	touch $(STAMP)

clean:
	rm -rf runs/demo .pytest_cache
