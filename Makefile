# mxmrelay: `make run` starts the relay for development, `make test` runs
# every check.  Both set up what they need on a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SOURCES := $(shell find mxmrelay twisted -name '*.py') setup.cfg pyproject.toml
CERT   := var/tls/localhost.pem
# Debian packages the tests drive as real clients.
TEST_TOOLS := swaks curl openssl chromium
# Debian packages of the compatibility tests' clients (tests/test_compat.py):
# installed when missing and when this Debian has them; a test whose client
# is absent is skipped.
TEST_PACKAGES := msmtp php-cli libphp-phpmailer fail2ban
# Nodemailer, from npm, into var/node when node and npm are there.
NODEMAILER := var/node/node_modules/nodemailer

.PHONY: run test lint typecheck unit bench tools clean

run: $(VENV)/.installed $(CERT)
	$(BIN)/twistd -n --pidfile= mxmrelay --config etc/mxmrelay.dev.toml

test: $(VENV)/.installed $(CERT) tools lint typecheck unit

unit: $(VENV)/.installed $(CERT)
	$(BIN)/python -m twisted.trial --temp-directory=var/_trial_temp tests

lint: $(VENV)/.installed
	$(BIN)/ruff check mxmrelay tests twisted $(wildcard bench)

typecheck: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed $(CERT)
	$(BIN)/python -m bench

# A plain (not editable) install: it is what a deployment gets, and it puts
# the plugin under site-packages/twisted/plugins where twistd looks.  The
# plugin cache is rebuilt here, as root, so the service never needs to
# write it.
$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '.[test]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

# A self-signed certificate for localhost, for development only.
$(CERT):
	mkdir -p var/tls
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
	  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
	  -keyout var/tls/localhost.key -out $(CERT) 2>/dev/null

# Real clients for the end-to-end tests; installed only when missing.
tools:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@missing=""; for p in $(TEST_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq || true; available=""; \
	  for p in $$missing; do \
	    if apt-cache policy $$p 2>/dev/null | grep -q 'Candidate: [^(]'; then available="$$available $$p"; \
	    else echo "not in this Debian, its tests will be skipped: $$p"; fi; \
	  done; \
	  if [ -n "$$available" ]; then \
	    echo "installing:$$available"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$available >/dev/null; \
	  fi; \
	fi
	@if [ ! -d $(NODEMAILER) ]; then \
	  if command -v node >/dev/null && command -v npm >/dev/null; then \
	    echo "installing: nodemailer (npm, into var/node)"; \
	    mkdir -p var/node && npm install --prefix var/node --no-audit --no-fund --silent nodemailer \
	      || echo "nodemailer could not be installed: its tests will be skipped"; \
	  else echo "no node/npm: the Nodemailer tests will be skipped"; fi; \
	fi

clean:
	rm -rf $(VENV) var build *.egg-info
