# Two entry points for a fresh Debian machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (system packages through apt-get when missing).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch==2.13.0 is the CPU build on the dev machines; pyproject's range keeps it in place.
TORCH  ?= torch==2.13.0

# System packages the tests use for real: Redis (registry), Chromium (a WHIP publisher),
# GStreamer's RTSP server under the system python3 (an RTSP camera for the pull tests).
SYSTEM_PKGS ?= redis-server chromium python3-gi gir1.2-gst-rtsp-server-1.0 \
	gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad

.PHONY: venv demo test lint format sysdeps serve

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

sysdeps:
	@dpkg -s $(SYSTEM_PKGS) >/dev/null 2>&1 || ( \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends $(SYSTEM_PKGS) )

test: venv sysdeps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	TRITON_INTERPRET=1 $(VENV)/bin/pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The live service with a real checkpoint (any `livelens serve` flag goes in ARGS).
MODEL ?= DAMO-NLP-SG/VideoLLaMA3-2B
serve: venv
	$(VENV)/bin/livelens serve --model $(MODEL) $(ARGS)
