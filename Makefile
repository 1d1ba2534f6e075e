# The two commands of the README: `make demo` and `make test`. Both run scripts/setup.sh first.
SWIFT ?= swift
CONFIG ?= release
QLORA_CACHE ?= $(HOME)/.cache/swift-qlora
export QLORA_CACHE
BIN = .build/$(CONFIG)/qlora
# `make test AUDIT="bash scripts/audit_opens.sh"` (what .ci/run does) fails when a test or the demo opens a
# file outside the repository, the setup cache and the system.
AUDIT ?=

.PHONY: all setup setup-demo build test demo bench fuzz clean

all: build

# What the tests need (OpenBLAS, the default model, xz and a headless browser for their fixtures and pages).
setup:
	@bash scripts/setup.sh test

# What the demo needs: OpenBLAS and the default model only.
setup-demo:
	@bash scripts/setup.sh demo

build: setup-demo
	$(SWIFT) build -c $(CONFIG) --product qlora

# Numerics are tested in release mode (as they run); tests never need Python.
test: setup
	$(SWIFT) build -c $(CONFIG) --build-tests
	$(AUDIT) $(SWIFT) test -c $(CONFIG) --skip-build

demo: build
	@$(AUDIT) bash scripts/demo.sh $(BIN)

# Side-by-side benchmarks against the Python reference stack (needs bench/requirements.txt in a venv).
bench: setup
	$(SWIFT) build -c release --product qlora-bench
	$(SWIFT) build -c release --product qlora
	@bash bench/run.sh

# libFuzzer over every parser of hostile input, FUZZ_SECONDS per target (a separate sanitized build; ROBUSTNESS.md).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
fuzz: setup
	@bash scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean:
	rm -rf .build
