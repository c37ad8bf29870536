# The two commands a new user needs: `make demo` and `make test`. Each runs
# `setup` first when the virtual environment is missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := redis-server rabbitmq-server erlang-base postgresql openssl shellcheck cloud-init iproute2 iptables openssh-server systemd

.PHONY: setup system-packages demo test test-unit bench bench-scale lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's servers and tools the local fleet and the tests use; installed only when missing.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: $(STAMP)
	$(BIN)/fleet demo

# Every tier (unit, infra, integration, faults), naming the slowest tests. Tests mostly
# wait on servers and subprocesses, so three pytest workers keep two cores busy; each
# test module runs whole on one worker, the fault tier alone on one (tests/conftest.py).
TEST_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25

# The unit and infra tiers: no server, no subprocess; what to run while working.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests/unit tests/infra

bench: $(STAMP)
	$(BIN)/python -m tests.bench.bench_fleet

bench-scale: $(STAMP)
	$(BIN)/python -m tests.bench.bench_scale

lint: $(STAMP)
	$(BIN)/ruff format --check app scripts tests infra
	$(BIN)/ruff check app scripts tests infra
	shellcheck scripts/fleet-boot.sh
	cd ansible && ../$(BIN)/ansible-lint --profile production

# Strict for app/ and infra/, lenient for scripts/ and tests/ ([tool.mypy] in pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache
