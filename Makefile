# The two commands: `make demo` and `make test` (`make test-fast` for the edit-test loop). Each sets everything
# up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed
APT_STAMP := .venv-apt-checked

.PHONY: demo test test-fast test-boards board-deps test-containers container-deps bench reproduce setup system-deps lint clean

setup: system-deps $(STAMP)

# Install through apt-get only what is missing: the Fashion-MNIST files, mosquitto, redis-server,
# docker-compose (validates docker/compose.yaml offline: `docker-compose config` needs no engine),
# iproute2 (tc, ip netns: harmony fleet emulate) and openssh-server/-client (tests/test_flash.py
# flashes a "board" behind a real sshd with ssh and scp) and chromium (the browser tests of the dashboard and
# report.html drive Debian's /usr/bin/chromium through playwright; no browser is downloaded) and prometheus
# (only its promtool is used: it validates docker/prometheus.yml and the Grafana dashboard's queries).
system-deps:
	@missing=""; \
	[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing="$$missing redis-server"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v tc >/dev/null || [ -x /usr/sbin/tc ] || missing="$$missing iproute2"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null && command -v scp >/dev/null || missing="$$missing openssh-client"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing with apt-get:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

# HARMONY against SplitFed, Multi-exit and SplitGP (lambda 0.2 and 1) on the quick start, two runs at
# a time (one torch thread each); HARMONY first, so the baselines fill the other slot meanwhile.
demo: setup
	$(BIN)/harmony compare examples/quickstart.yaml --jobs 2 \
	  --algorithms "harmony,splitfed,multi-exit,splitgp(lambda=0.2),splitgp(lambda=1)" --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

# The edit-test loop: everything but the tests marked slow (those that start real processes —
# mosquitto, redis-server, Celery, agents, sshd, chromium — or run an experiment for minutes).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# `harmony flash` onto emulated Raspberry Pi 4s (tests/test_boards.py; tens of minutes): a Debian arm64
# root made by debootstrap (cached), run by qemu-user-static through binfmt_misc, from an arm64 wheelhouse.
test-boards: setup board-deps
	$(BIN)/python -m pytest -q -m boards tests/test_boards.py

board-deps:
	@missing=""; \
	command -v qemu-aarch64-static >/dev/null || missing="$$missing qemu-user-static"; \
	command -v update-binfmts >/dev/null || [ -x /usr/sbin/update-binfmts ] || missing="$$missing binfmt-support"; \
	command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	if [ -n "$$missing" ]; then \
	  echo "installing with apt-get:$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The images and the compose fleet on a real Docker engine (tests/test_containers.py; docker/README.md has
# the times): Debian's dockerd in a network namespace of its own, base images made from debootstrap roots,
# the server and agent images for amd64 and the agent for arm64 built from wheelhouses, a HARMONY round
# through the compose fleet's driver. Needs root; images are cached in $HARMONY_CACHE/docker.
test-containers: setup board-deps container-deps
	$(BIN)/python -m pytest -q -m containers tests/test_containers.py

container-deps:
	@command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || { 	  echo "installing with apt-get: docker.io"; 	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; }

# Speed and overhead figures (a few minutes each); see benchmarks/RESULTS.md.
bench: setup
	$(BIN)/python benchmarks/engine_throughput.py
	$(BIN)/python benchmarks/engine_throughput.py --algorithm harmony
	$(BIN)/python benchmarks/speed_options.py
	$(BIN)/python benchmarks/distributed_overhead.py
	$(BIN)/python benchmarks/agent_footprint.py
	$(BIN)/python benchmarks/reproduce_fmnist.py --scale paper --project

# The documented reduced-scale CPU reproduction of the paper's Table 2 (6 algorithms x 3 seeds),
# JOBS runs at once (one torch thread each); interrupted, it picks up where it stopped.
JOBS ?= 2
reproduce: setup
	$(BIN)/python benchmarks/reproduce_fmnist.py --scale reduced --seeds 3 --jobs $(JOBS) --resume --out runs/reproduce-reduced

lint: setup
	$(BIN)/ruff check harmony broker edge_agent server orchestrator testbed tests benchmarks

clean:
	rm -rf runs .pytest_cache
