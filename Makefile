# egressgate — the two set-up commands:
#   make run    runs the gateway on its embedded default config (127.0.0.1:3128, admin 127.0.0.1:9128)
#   make test   runs the whole test suite on the pure-Python build, then a subset on the compiled one
# Both install what they need (a venv with pip packages; Debian packages for real peers).

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
HASH    := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN_STAMP := $(VENV)/.run-$(HASH)
STAMP   := $(VENV)/.test-$(HASH)
CONFIG  ?=
# The compiled build (issue 27; Cython, setup.py with EGRESSGATE_COMPILE=1) lives in its own venv,
# installed from a wheel, never in-place: a .so beside a .py in src/ would shadow the .py in .venv.
CVENV   := .venv-compiled
CBIN    := $(CVENV)/bin
CSTAMP  := $(CVENV)/.compiled
SRC_PY  := $(shell find src -name '*.py')
# On the compiled build `make test` runs every unit test, the proxy/tunnel/SOCKS integration tests
# and the instruction guard (the full suite twice would not fit CI's time on 2 cores).
COMPILED_TESTS := tests/unit tests/perf tests/test_suite_rules.py \
	tests/integration/test_forwarding.py tests/integration/test_tunnel.py tests/integration/test_socks.py \
	tests/integration/test_protect.py tests/integration/test_refusals.py tests/integration/test_strict_protocol.py \
	tests/integration/test_hostile_peers.py tests/integration/test_faults.py tests/integration/test_clients.py \
	tests/integration/test_egress.py
PYTEST_ARGS ?=
APT_TEST_PACKAGES := curl tinyproxy chromium iproute2 util-linux iptables shellcheck logrotate systemd jq redis-server valgrind gcc python3-dev

.PHONY: compiled test-pure test-compiled run test test-unit lint fuzz bench bench-quick demo check-config clean deb-packages

# `make run` needs only the gateway's own dependencies; `make test` adds the test tools.
$(RUN_STAMP): pyproject.toml
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	@$(PY) -m venv $(VENV) 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PY) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	@rm -f $(VENV)/.run-*
	@touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install -q -e '.[test]'
	@rm -f $(VENV)/.test-*
	@touch $(STAMP)

# checkov (IaC security checks on deploy/) lives in its own venv: it conflicts with python-hcl2.
CHECKOV := $(VENV)/checkov-venv/bin/checkov
$(CHECKOV):
	$(PY) -m venv $(VENV)/checkov-venv
	$(VENV)/checkov-venv/bin/pip install -q --upgrade pip
	$(VENV)/checkov-venv/bin/pip install -q checkov

run: $(RUN_STAMP)
	$(BIN)/egressgate serve $(if $(CONFIG),--config $(CONFIG))

demo: $(RUN_STAMP)
	$(BIN)/egressgate demo

check-config: $(RUN_STAMP)
	$(BIN)/egressgate check-config $(CONFIG)

deb-packages:
	@missing=""; for p in $(APT_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "not root: tests needing$$missing will be skipped (under CI=true: fail)"; fi; \
	fi

# The compiled build: gcc and the Python headers (python3-dev) compile the hot core (setup.py's
# COMPILED list); build/ is cleared first so no module dropped from that list lingers in the wheel.
$(CSTAMP): $(SRC_PY) setup.py pyproject.toml
	@$(PY) -m venv $(CVENV)
	$(CBIN)/pip install -q --upgrade pip 'setuptools>=77' wheel 'cython>=3,<4'
	rm -rf build
	EGRESSGATE_COMPILE=1 $(CBIN)/pip install -q --no-build-isolation '.[test]'
	@$(CBIN)/egressgate --version | grep -q '(compiled)' || { echo "$(CVENV) is not the compiled build"; exit 1; }
	@touch $(CSTAMP)

compiled: $(CSTAMP)

# The suite runs in a private network namespace (loopback only, DNS pointed at nothing) when
# it can, so no test can reach anything off this machine; see scripts/in-netns.
# EGRESSGATE_EXPECT_BUILD makes tests/unit/test_build.py check which build each run imports.
test: test-pure test-compiled

test-pure: $(STAMP) $(CHECKOV) deb-packages
	EGRESSGATE_EXPECT_BUILD=pure EGRESSGATE_CHECKOV=$(CHECKOV) scripts/in-netns $(BIN)/python -m pytest $(PYTEST_ARGS)

test-compiled: deb-packages $(CSTAMP)
	EGRESSGATE_EXPECT_BUILD=compiled scripts/in-netns $(CBIN)/python -m pytest $(COMPILED_TESTS) $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench fuzz

# Coverage-guided fuzzing of the request-head parser (atheris); FUZZ_SECONDS bounds the run.
FUZZ_SECONDS ?= 120
fuzz: $(STAMP)
	$(BIN)/pip install -q -e '.[fuzz]'
	mkdir -p fuzz/corpus
	$(BIN)/python fuzz/fuzz_request_head.py fuzz/corpus -max_total_time=$(FUZZ_SECONDS)

bench: $(STAMP) $(CSTAMP)
	$(BIN)/python bench/instructions.py --kinds request,tunnel,socks \
		--peers egressgate,egressgate-policy,egressgate-protect,egressgate-fleet,egressgate-compiled,egressgate-policy-compiled,egressgate-protect-compiled,squid,tinyproxy,trafficserver \
		--out bench/results/instructions
	$(BIN)/python bench/run.py --peers squid,tinyproxy,trafficserver,egressgate,egressgate-policy,egressgate-compiled,egressgate-policy-compiled
	$(BIN)/python bench/protect_cost.py   # shared-IP protection's cost per request, with and without a fleet store

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) $(CVENV) .pytest_cache build *.egg-info src/*.egg-info
