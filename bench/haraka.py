"""Haraka, the same-work peer: a Node.js SMTP server doing the relay's job.

Installed from npm into ``var/haraka`` (as the tests install Nodemailer
into ``var/node``) the first time the bench wants it; when Node or npm is
missing or the install fails, :class:`Unavailable` says why and the bench
skips the row.  Each instance gets a configuration folder of its own in
the bench's work folder: one listener on loopback (STARTTLS with the
bench's certificate and key), ``auth/flat_file`` with the bench's user for
``AUTH PLAIN``, Haraka's default log level (``info``, to a file), no
cluster (one process), and one queue plugin written here:

- ``post`` (*haraka*): the relay's job.  The message is POSTed to the same
  null API as the relay's (multipart: JSON metadata and the message, on a
  keep-alive agent) and the client gets ``250`` only after the API's 2xx;
  anything else is a ``451``.
- ``discard`` (*haraka-discard*): accept and drop, Haraka's own floor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench import procs
from bench.loadgen import PASSWORD, USER
from bench.scenarios import Bench, Server

#: Where the bench installs Haraka, and which release.
PREFIX = procs.ROOT / "var" / "haraka"
PACKAGE = "Haraka@3.3.4"
HARAKA = PREFIX / "node_modules" / "Haraka" / "bin" / "haraka"

POST_PLUGIN = r"""'use strict'
// The relay's job: POST the message to the delivery API, 250 only after its 2xx.
const http = require('node:http')
const crypto = require('node:crypto')
const url = process.env.BENCH_API_URL
const token = process.env.BENCH_API_TOKEN || ''
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 })

const addr = (a) => (typeof a.address === 'function' ? a.address() : a.address)

exports.register = function () {
    this.register_hook('queue', 'post')
    this.register_hook('queue_outbound', 'post')
}

exports.post = function (next, connection) {
    const txn = connection.transaction
    txn.message_stream.get_data((message) => {
        const boundary = crypto.randomBytes(16).toString('hex')
        const metadata = JSON.stringify({
            mail_from: addr(txn.mail_from),
            rcpt_to: txn.rcpt_to.map(addr),
            user: connection.notes.auth_user,
        })
        const body = Buffer.concat([
            Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="metadata"\r\n`
                + `Content-Type: application/json\r\n\r\n${metadata}\r\n--${boundary}\r\n`
                + 'Content-Disposition: form-data; name="message"\r\n'
                + 'Content-Type: message/rfc822\r\n\r\n'),
            message,
            Buffer.from(`\r\n--${boundary}--\r\n`),
        ])
        const req = http.request(url, {
            method: 'POST', agent, headers: {
                'Content-Type': `multipart/form-data; boundary=${boundary}`,
                'Content-Length': body.length,
                'Authorization': `Bearer ${token}`,
                'Idempotency-Key': txn.uuid,
            },
        }, (res) => {
            res.resume()
            res.on('end', () => {
                if (res.statusCode >= 200 && res.statusCode < 300) next(OK, 'queued')
                else next(DENYSOFT, `delivery API answered ${res.statusCode}`)
            })
        })
        req.on('error', (err) => next(DENYSOFT, `delivery API: ${err.message}`))
        req.end(body)
    })
}
"""

DISCARD_PLUGIN = r"""'use strict'
// Accept and drop: Haraka's own floor.
exports.register = function () {
    this.register_hook('queue', 'discard')
    this.register_hook('queue_outbound', 'discard')
}
exports.discard = function (next) { next(OK) }
"""


class Unavailable(Exception):
    """Node, npm or Haraka cannot be had here: the row is skipped."""


def ensure_installed() -> Path:
    """Haraka's launcher, installing it into ``var/haraka`` when missing."""
    if HARAKA.exists():
        return HARAKA
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise Unavailable("no node/npm on this machine")
    PREFIX.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([npm, "install", "--prefix", str(PREFIX), "--no-audit", "--no-fund",
                        "--silent", PACKAGE], check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise Unavailable(f"npm install {PACKAGE} failed: {e}") from None
    if not HARAKA.exists():
        raise Unavailable(f"npm install {PACKAGE} left no {HARAKA}")
    return HARAKA


class Haraka(Server):
    """One Haraka process on the server's CPU, with the ``post`` or the
    ``discard`` queue plugin."""

    def __init__(self, bench: Bench, mode: str) -> None:
        super().__init__(bench)
        self.mode = mode
        self.label = "haraka" if mode == "post" else "haraka-discard"
        self.launcher = ensure_installed()
        node = shutil.which("node")
        assert node is not None  # ensure_installed checked
        self.node = node
        self.config = bench.work / f"haraka-{self.starttls_port}"

    def write_config(self) -> None:
        """``ROOT/config/*`` (the settings, ``plugins`` being the list) and
        ``ROOT/plugins/*.js`` (the local plugins)."""
        b = self.bench
        conf, local = self.config / "config", self.config / "plugins"
        # Haraka's own defaults first (it wants some of them, e.g.
        # connection.ini), then the bench's settings over them.
        shutil.copytree(HARAKA.parent.parent / "config", conf, dirs_exist_ok=True)
        local.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(b.cert, conf / "tls_cert.pem")
        shutil.copyfile(b.key, conf / "tls_key.pem")
        # Both ports, STARTTLS on each (the bench's servers all have two).
        (conf / "smtp.ini").write_text(
            f"listen=127.0.0.1:{self.starttls_port},127.0.0.1:{self.smtps_port}\n"
            "inactivity_timeout=300\n")
        (conf / "me").write_text("localhost\n")
        (conf / "tls.ini").write_text("key=tls_key.pem\ncert=tls_cert.pem\n")
        (conf / "log.ini").write_text("[main]\nlevel=info\ntimestamps=false\n")
        (conf / "auth_flat_file.ini").write_text(
            f"[core]\nmethods=PLAIN,LOGIN\n\n[users]\n{USER}={PASSWORD}\n")
        plugin = "bench_post" if self.mode == "post" else "bench_discard"
        (local / f"{plugin}.js").write_text(
            POST_PLUGIN if self.mode == "post" else DISCARD_PLUGIN)
        (conf / "plugins").write_text(f"tls\nauth/flat_file\n{plugin}\n")

    def argv(self) -> list[str]:
        return [self.node, str(self.launcher), "-c", str(self.config)]

    def start(self) -> Server:
        self.write_config()
        b = self.bench
        self.proc = b.track(procs.SERVER_CPU, procs.Process(
            self.label, procs.pinned(procs.SERVER_CPU, self.argv()),
            b.work / f"{self.label}-{self.starttls_port}.log",
            [self.starttls_port, self.smtps_port], cwd=self.config,
            env={**os.environ, "BENCH_API_URL": b.api_url, "BENCH_API_TOKEN": "bench-token"},
        )).start()
        return self
