# `make demo` runs the four notebooks on the embedded default; `make test` runs the tests.
# Both create .venv and install sdnb into it from this repo's own files when needed.
# `make test-full` runs the notebooks on random models of the real shapes (SD v1.5, BLIP-base; ~15 GB of RAM), written
# once into FULL_ASSETS; each run's time, memory and sizes go to runs/full/table.md.
FULL_ASSETS ?= runs/full-assets
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdnb-installed

.PHONY: demo test test-full bench install clean

demo: $(STAMP)
	$(PY) -m sdnb.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-full: $(STAMP)
	nice $(PY) -m sdnb.demo.full --assets $(FULL_ASSETS) --out runs/full

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
