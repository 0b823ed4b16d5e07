# mxmrelay: `make run` starts the relay for development, `make test` runs
# every check.  Both set up what they need on a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SOURCES := $(shell find mxmrelay mxmrelay_refapi twisted -name '*.py') setup.cfg pyproject.toml
CERT   := var/tls/localhost.pem
# Every dependency pinned, with its hashes, so each install gets the same
# packages whatever PyPI released since: requirements.lock has what the
# relay runs with (a deployment installs that), requirements-test.lock the
# same pins plus the tests' tools (this venv installs that).  setup.cfg
# keeps ranges, for people who install the package into an environment of
# their own.  `make lock` refreshes both.
RUNTIME_LOCK := requirements.lock
LOCK   := requirements-test.lock
# `make lock` resolves against PyPI itself, never against a mirror or a
# local wheel folder some pip configuration may add: the hashes must be
# those every other machine gets.
PYPI   := https://pypi.org/simple
# The resolver, in a venv of its own under var/ (never in .venv, which
# must hold exactly the lock).
LOCK_TOOLS := var/lock-tools
UV_VERSION := 0.13.9

# Debian packages the tests drive as real clients, by the command each
# provides ...
TEST_TOOLS := swaks curl openssl chromium
# ... and the compatibility tests' clients (tests/test_compat.py, the
# fail2ban filter test), and the servers of the several-relays tests
# (tests/test_redis_state.py, tests/test_haproxy.py: a redis-server and a
# haproxy each test starts on loopback ports of its own, never the
# packages' own daemons), installed when this Debian has them.  Every one of
# them is optional: a test whose client is missing is skipped, with the
# reason, and the relay's own tests need none of them.
TEST_PACKAGES := msmtp php-cli libphp-phpmailer fail2ban redis-server haproxy
# Seconds to wait for apt's lock when another apt or dpkg holds it.
APT_LOCK_TIMEOUT ?= 120
# Consulted by every package's maintainer scripts before starting a service.
POLICY_RC_D ?= /usr/sbin/policy-rc.d
# Nodemailer, from npm, into var/node when node and npm are there.
NODEMAILER := var/node/node_modules/nodemailer

# `make run` starts two processes: the reference delivery API
# (etc/refapi.dev.toml) in the background and the relay
# (etc/mxmrelay.dev.toml) in the foreground; when the relay ends (Ctrl-C,
# or a start-up error), the API is stopped too.
# `make run PORTS=SMTP,SUBMISSION,SMTPS,API` runs both on other ports: the
# smtp (25 role), submission (587 role) and smtps (465 role) listeners and
# the reference delivery API, in that order (the defaults are
# 2525,2587,2465,8025).  The copies are written under var/, one pair per
# set of ports, so two of them on one checkout do not clash.  A fifth port
# moves the metrics listener (9125) too; with four it stays, so a second
# copy running at the same time needs the fifth.
PORTS ?=
comma := ,
PORTS_TAG := $(subst $(comma),-,$(PORTS))
DEV_CONFIG := $(if $(PORTS),var/mxmrelay.dev.$(PORTS_TAG).toml,etc/mxmrelay.dev.toml)
REFAPI_CONFIG := $(if $(PORTS),var/refapi.dev.$(PORTS_TAG).toml,etc/refapi.dev.toml)

.PHONY: run test lint typecheck unit bench tools lock dev-config clean

# The API's process is started by this recipe's shell and stopped by it,
# whatever ends the relay (a background process of a shell ignores the
# terminal's Ctrl-C, hence the trap).
run: $(VENV)/.installed $(CERT) $(if $(PORTS),dev-config)
	$(BIN)/twistd -n --pidfile= mxmrelay-refapi --config $(REFAPI_CONFIG) & api=$$!; \
	trap 'kill $$api 2>/dev/null; wait $$api' EXIT; trap 'exit 130' INT; trap 'exit 143' TERM; \
	$(BIN)/twistd -n --pidfile= mxmrelay --config $(DEV_CONFIG)

test: $(VENV)/.installed $(CERT) tools lint typecheck unit

unit: $(VENV)/.installed $(CERT)
	$(BIN)/python -m twisted.trial --temp-directory=var/_trial_temp tests

lint: $(VENV)/.installed
	$(BIN)/ruff check mxmrelay tests twisted $(wildcard bench)

typecheck: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed $(CERT)
	$(BIN)/python -m bench

# The dependencies from the lock, hashes checked, then the project itself
# without dependencies (the lock has them all; nothing unpinned sneaks in;
# pip check says so when setup.cfg changed and the lock did not).
# A plain (not editable) install: it is what a deployment gets, and it puts
# the plugin under site-packages/twisted/plugins where twistd looks.  The
# plugin cache is rebuilt here, as root, so the service never needs to
# write it.  An existing venv is updated in place, never removed.
$(VENV)/.installed: $(SOURCES) $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps .
	@$(BIN)/pip check >/dev/null || { $(BIN)/pip check; \
	  echo "the locks do not satisfy setup.cfg: run make lock"; exit 1; }
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

# Re-resolve setup.cfg's ranges into the locks: the runtime dependencies,
# then the test extra on top of exactly those pins.  Versions already
# locked are kept where the ranges still allow them; `make lock UPGRADE=1`
# moves every package to its newest release.  --universal: one lock for
# every Python >= 3.11 and every platform (each release's hashes for all of
# its files), so a Debian 13 server installs from the same file as a
# Debian 12 laptop.
UV_COMPILE = $(LOCK_TOOLS)/bin/uv pip compile --quiet --no-config --index-url $(PYPI) \
  --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" \
  $(if $(UPGRADE),--upgrade)
lock:
	test -x $(LOCK_TOOLS)/bin/uv || { $(PYTHON) -m venv $(LOCK_TOOLS) && \
	  $(LOCK_TOOLS)/bin/pip install --quiet --isolated --index-url $(PYPI) uv==$(UV_VERSION); }
	$(UV_COMPILE) setup.cfg -o $(RUNTIME_LOCK)
	$(UV_COMPILE) --extra test --extra refapi -c $(RUNTIME_LOCK) setup.cfg -o $(LOCK)

# A self-signed certificate for localhost, for development only.  Made with
# the venv's own cryptography package, so `make run` needs no openssl.
$(CERT): | $(VENV)/.installed
	mkdir -p $(dir $(CERT))
	$(BIN)/python -c "$$MAKE_CERT" $(CERT) $(CERT:.pem=.key)

define MAKE_CERT
import datetime, ipaddress, os, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
now = datetime.datetime.now(datetime.UTC)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256()))
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
with open(sys.argv[1], "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
endef
export MAKE_CERT

# The development configurations, the relay's and the reference API's,
# with PORTS in place of their ports and their relative paths made absolute
# (the copies live elsewhere).  Regenerated on every `make run PORTS=...`,
# so they always follow etc/mxmrelay.dev.toml and etc/refapi.dev.toml.
dev-config:
	@test -n "$(PORTS)" || { echo "PORTS=SMTP,SUBMISSION,SMTPS,API is required"; exit 2; }
	@mkdir -p $(dir $(DEV_CONFIG)) $(dir $(REFAPI_CONFIG))
	@$(PYTHON) -c "$$WITH_PORTS" "$(PORTS)" etc/mxmrelay.dev.toml $(DEV_CONFIG) \
	  etc/refapi.dev.toml $(REFAPI_CONFIG)
	@echo "$(DEV_CONFIG): smtp, submission, smtps on $(PORTS)"
	@echo "$(REFAPI_CONFIG): the reference API on $(lastword $(subst $(comma), ,$(PORTS)))"

define WITH_PORTS
import os, re, sys, tomllib
from pathlib import Path
ports = sys.argv[1]
relay, relay_target = Path(sys.argv[2]).resolve(), Path(sys.argv[3])
refapi, refapi_target = Path(sys.argv[4]).resolve(), Path(sys.argv[5])
def port(endpoint):
    return int(re.match(r"tcp:(\d+)", endpoint).group(1))
config = tomllib.loads(relay.read_text())
roles = {listener["role"]: port(listener["endpoint"]) for listener in config["listener"]}
api = port(tomllib.loads(refapi.read_text())["endpoint"])
old = [roles["smtp"], roles["submission"], roles["smtps"], api]
if "metrics" in config:
    old.append(port(config["metrics"]["endpoint"]))
try:
    new = [int(p) for p in ports.split(",")]
    if len(new) not in (4, len(old)) or len(set(new)) != len(new) or not all(
            0 < p < 65536 for p in new):
        raise ValueError
except ValueError:
    sys.exit(f"PORTS={ports}: want four different ports: smtp,submission,smtps,api "
             "(and a fifth, for metrics, if you like)")
ports_of = dict(zip(old[:len(new)], new, strict=True))
def swap(m):
    return m.group(1) + str(ports_of.get(int(m.group(2)), m.group(2)))
def absolute(source):
    return lambda m: m.group(1) + os.path.normpath(source.parent / m.group(2)) + m.group(3)
copies = []
for source, target in ((relay, relay_target), (refapi, refapi_target)):
    text = source.read_text()
    # tcp:PORT endpoints, and the delivery API's http://HOST:PORT/ URL.
    text = re.sub(r"(tcp:)(\d+)", swap, text)
    text = re.sub(r"(://[^/:\"]+:)(\d+)", swap, text)
    text = re.sub(r"(?m)^(\s*(?:directory|certificate|private_key|database|ca_file)\s*=\s*\")"
                  r"([^\"/][^\"]*)(\")", absolute(source), text)
    tomllib.loads(text)
    copies.append((target, f"# Generated by `make run PORTS={ports}` from {source}: "
                            "do not edit.\n" + text))
for target, text in copies:
    target.write_text(text)
endef
export WITH_PORTS

# Real clients for the end-to-end tests, installed system-wide with apt when
# missing (see the README): the tests' only changes to the machine.  Never
# fatal: with no root, no network or apt busy for over two minutes, the
# packages it could not install are named and their tests skip.
tools:
	@bash -c "$$INSTALL_TOOLS" install-tools "$(TEST_TOOLS)" "$(TEST_PACKAGES)"
	@if [ ! -d $(NODEMAILER) ]; then \
	  if command -v node >/dev/null && command -v npm >/dev/null; then \
	    echo "installing: nodemailer (npm, into var/node)"; \
	    mkdir -p var/node && npm install --prefix var/node --no-audit --no-fund --silent nodemailer \
	      || echo "nodemailer could not be installed: its tests will be skipped"; \
	  else echo "no node/npm: the Nodemailer tests will be skipped"; fi; \
	fi

define INSTALL_TOOLS
set -u
tools=$$1 packages=$$2 missing=""
for t in $$tools; do command -v $$t >/dev/null || missing="$$missing $$t"; done
for p in $$packages; do
  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"
done
[ -z "$$missing" ] && exit 0
skip() { echo "not installed ($$1), their tests will be skipped:$$2"; exit 0; }
command -v apt-get >/dev/null || skip "no apt-get" "$$missing"
if [ "$$(id -u)" = 0 ]; then sudo=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"
else skip "apt-get needs root" "$$missing"; fi
# Wait for another apt or dpkg (unattended-upgrades, a package manager
# window) rather than fail at once, then go on without.
apt="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=$(APT_LOCK_TIMEOUT)"
$$apt update >/dev/null 2>&1 || echo "apt-get update failed: trying with the package lists there are"
available=""
for p in $$missing; do
  if apt-cache policy $$p 2>/dev/null | grep -q 'Candidate: [^(]'; then available="$$available $$p"
  else echo "not in this Debian, its tests will be skipped: $$p"; fi
done
[ -z "$$available" ] && exit 0
# Installing a package must not start a daemon (fail2ban would start
# banning with Debian's sshd jail) nor enable one for the next boot:
# policy-rc.d answers "not allowed" (101) for the duration of the install
# (an existing one is put back afterwards), and whatever unit the install
# enabled is disabled again.
policy=$(POLICY_RC_D) saved=""
enabled() { systemctl list-unit-files --state=enabled --no-legend 2>/dev/null | awk '{print $$1}' | sort; }
before=$$(enabled)
restore() {
  if [ -n "$$saved" ]; then $$sudo mv -f "$$saved" $$policy; else $$sudo rm -f $$policy; fi
}
# A saved copy left by an interrupted run is the original: keep it.
if [ -e $$policy.mxmrelay-saved ]; then saved=$$policy.mxmrelay-saved
elif [ -e $$policy ]; then saved=$$policy.mxmrelay-saved; $$sudo mv -f $$policy "$$saved"; fi
trap restore EXIT
trap 'exit 1' INT TERM
printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$policy >/dev/null && $$sudo chmod 755 $$policy
echo "installing:$$available"
if ! $$apt install $$available >/dev/null; then
  for p in $$available; do
    $$apt install $$p >/dev/null 2>&1 || echo "could not install $$p: its tests will be skipped"
  done
fi
for unit in $$(comm -13 <(echo "$$before") <(enabled)); do
  echo "disabling $$unit (enabled by its package; the tests need no daemon)"
  $$sudo systemctl disable --quiet $$unit || true
done
exit 0
endef
export INSTALL_TOOLS

clean:
	rm -rf $(VENV) var build *.egg-info
