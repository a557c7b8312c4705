# Two entry points for a fresh Debian machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (system packages through apt-get when missing).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch==2.13.0 is the CPU build on the dev machines; pyproject's range keeps it in place.
TORCH  ?= torch==2.13.0

.PHONY: venv demo test lint format

$(VENV)/.installed: pyproject.toml
	@python3 -c "import ensurepip, venv" 2>/dev/null || \
		(apt-get update -qq && apt-get install -y -qq python3-venv python3-pip)
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m livelens.stream.demo

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	TRITON_INTERPRET=1 $(VENV)/bin/pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
