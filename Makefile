# The two commands a new machine needs: `make demo` runs the main job, `make test` the tests.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench lint clean
setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/fsl-edge models pull smollm2
	$(BIN)/fsl-edge up

test: setup
	@bash scripts/test.sh

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/transport.py

clean:
	rm -rf $(VENV) build *.egg-info
