# gpupool: build, test, e2e, demo, generated files, benchmarks, lint.
# `make test` is what CI runs (through .ci/run); `make demo` is the tour.

SHELL := /usr/bin/env bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
ORGS ?= 3
TESTENV := target/debug/testenv
STATE ?= e2e/.state
export GPUPOOL_TESTENV := $(abspath $(STATE))

.PHONY: help build crds check-generated fmt lint unit testenv-binaries testenv-up testenv-down e2e test demo bench clean

help: ## list targets
	@awk -F ':.*## ' '/^[a-z-]+:.*## / { printf "  %-18s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

build: ## build every binary (operator, agent, cli, testenv)
	$(CARGO) build --workspace --bins

crds: ## regenerate crds/yaml from the Rust types
	$(CARGO) run -q -p gpupool-crds --bin gen -- crds/yaml

check-generated: crds ## fail when committed generated files differ from a fresh run
	@if ! git diff --exit-code --stat -- crds/yaml || [ -n "$$(git status --porcelain -- crds/yaml)" ]; then \
	  echo "crds/yaml is out of date: run 'make crds' and commit the result" >&2; exit 1; fi

fmt: ## format the code
	$(CARGO) fmt --all

lint: ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: ## unit tests: no server needed
	$(CARGO) test --workspace --exclude gpupool-e2e

testenv-binaries: ## build (or reuse cached) etcd, kube-apiserver, controller-manager, scheduler, kwok, helm
	bash e2e/testenv/build.sh

testenv-up: build testenv-binaries ## start ORGS (default 3) simulated organisations' clusters on loopback
	$(TESTENV) up --orgs $(ORGS) --agent target/debug/gpupool-agent

testenv-down: ## stop the clusters and remove their state
	@if [ -x $(TESTENV) ]; then $(TESTENV) down; else rm -rf $(STATE); fi

e2e: build testenv-binaries ## end-to-end tests against real clusters (starts and stops them)
	$(MAKE) --no-print-directory testenv-down
	trap '$(MAKE) --no-print-directory testenv-down' EXIT; \
	  $(TESTENV) up --orgs $(ORGS) --agent target/debug/gpupool-agent; \
	  $(CARGO) test -p gpupool-e2e -- --test-threads=1

test: lint check-generated unit e2e ## everything CI checks

demo: build testenv-binaries ## bring up the pool and run a job through it
	bash e2e/demo.sh

bench: build testenv-binaries ## benchmarks; JSON figures land in target/bench/
	bash e2e/bench.sh

clean: testenv-down
	$(CARGO) clean
