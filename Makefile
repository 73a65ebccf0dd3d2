# nexlab: `make workbook` runs every notebook on the embedded default model,
# `make test` runs the unit tests and every notebook in smoke mode.
# Both create .venv and install nexlab (with llama-cpp-python, built from source) when needed;
# `nexlab setup` then fetches llama.cpp's source (the tree llama-cpp-python vendors: its converter)
# and builds its tools (llama-bench, llama-server, ...) into ~/.cache/nexlab, shared by every clone.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nexlab-installed
TEST_STAMP := $(VENV)/.nexlab-test-installed
export NEXLAB_NO_PROGRESS ?= 0

.PHONY: install tools workbook smoke test lint test-browser unit lab bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(BIN)/nexlab setup
	touch $(STAMP)

# llama.cpp's tools (nexlab.llamacpp.build.TOOLS): built once; an older cache lacking a newer tool
# (e.g. llama-mtmd-cli) is rebuilt once here; a complete one costs a second
tools: $(STAMP)
	$(BIN)/nexlab setup

workbook: tools
	$(BIN)/nexlab workbook

smoke: tools
	$(BIN)/nexlab workbook --smoke

# the `test` extra: pytest, scipy (an oracle), import-linter and ruff
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

# the import-layer contract (pyproject.toml [tool.importlinter]) and ruff (package, tests, benchmarks, notebooks)
lint: $(TEST_STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check nexlab tests benchmarks notebooks

test: tools lint
	$(BIN)/python -m pytest -q -rs

# JupyterLab + headless Chromium (Debian's chromium package, installed here when run as root) driven by
# playwright (the `browser` extra; playwright's own browser downloads are never used): every chapter
# in smoke mode (NEXLAB_BROWSER_CHAPTERS=NN_a,NN_b: only those), about 2.5 minutes on 2 cores.
BROWSER_STAMP := $(VENV)/.nexlab-browser-installed

$(BROWSER_STAMP): $(TEST_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,browser]"
	touch $(BROWSER_STAMP)

test-browser: tools $(BROWSER_STAMP)
	@command -v $${CHROMIUM:-chromium} >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make test-browser needs Chromium: apt-get install chromium (as root), or CHROMIUM=/path/to/chromium"; exit 1; fi; }
	$(BIN)/python -m pytest -q -rs --browser tests/test_browser.py

unit: tools $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not notebook"

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf build/
