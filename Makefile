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
	@# Flower for the quality protocol's peer row, on its own: flwr caps typer < 0.21, amqtt 0.12.1 needs 0.24
	$(BIN)/python -c 'import flwr.simulation, ray' 2>/dev/null || $(BIN)/pip install "flwr[simulation]>=1.42,<2"
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/transport.py

clean:
	rm -rf $(VENV) build *.egg-info
