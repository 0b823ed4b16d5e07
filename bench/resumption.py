"""Which real clients resume TLS sessions across connections?

A relay can spare a client that connects once per message the full TLS
handshake only if the client offers resumption (a TLS 1.3 ticket or a
TLS 1.2 session id) on its next connection.  This measures it, for the
clients the tests drive: each sends two messages on two connections
(``STARTTLS``, ``AUTH``, one message, ``QUIT``) to a small SMTP server
here that supports resumption (Python's ``ssl`` server side: TLS 1.3
tickets and TLS 1.2 session ids and tickets on, OpenSSL's defaults), and
the server records, per connection, whether OpenSSL resumed the session
(``SSLSocket.session_reused``, cross-checked with the context's
``session_stats()["hits"]``).

Libraries (Python's smtplib, PHPMailer, Nodemailer) send both messages
from one process, as an application does; command-line clients (curl,
swaks, msmtp) are run twice, as a cron script does.  Two controls show
that the server resumes when asked: Python's ``ssl`` given the first
connection's ``session``, and ``openssl s_client -sess_out``/``-sess_in``.

    python -m bench.resumption        # also the end of ``make bench``
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from bench.loadgen import MAIL_FROM, PASSWORD, USER

RCPT = "rcpt0@example.org"
NODEMAILER = procs.ROOT / "var" / "node" / "node_modules" / "nodemailer"
PHPMAILER = Path("/usr/share/php/libphp-phpmailer/autoload.php")
MESSAGE = (f"From: <{MAIL_FROM}>\r\nTo: <{RCPT}>\r\nSubject: resumption\r\n\r\nhello\r\n")


@dataclass
class Recorder:
    """What the server saw: per TLS connection, (version, resumed)."""

    connections: list[tuple[str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SMTPServer:
    """A small threaded SMTP server: STARTTLS, AUTH PLAIN/LOGIN, accepts
    and drops every message.  One ``ssl.SSLContext`` per server, so that
    its session cache and statistics are one client's."""

    def __init__(self, cert: Path, key: Path, version: ssl.TLSVersion) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.maximum_version = version
        self.seen = Recorder()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _session(self, sock: socket.socket) -> None:
        sock.settimeout(20)
        try:
            self._dialogue(sock)
        except (OSError, ValueError):
            pass
        finally:
            sock.close()

    def _dialogue(self, sock: socket.socket) -> None:
        f = sock.makefile("rb")
        sock.sendall(b"220 localhost ESMTP\r\n")
        tls = False
        while line := f.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"EHLO":
                sock.sendall(b"250-localhost\r\n" + (b"" if tls else b"250-STARTTLS\r\n")
                             + b"250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250 SIZE 10240000\r\n")
            elif verb == b"STARTTLS" and not tls:
                sock.sendall(b"220 go ahead\r\n")
                wrapped = self.ctx.wrap_socket(sock, server_side=True)
                with self.seen.lock:
                    self.seen.connections.append((wrapped.version() or "?",
                                                  bool(wrapped.session_reused)))
                sock, tls = wrapped, True
                f = sock.makefile("rb")
            elif verb == b"AUTH":
                words = line.split()
                if words[1:2] == [b"LOGIN"]:
                    for prompt in (b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"):
                        sock.sendall(prompt)
                        f.readline()
                elif len(words) < 3:
                    sock.sendall(b"334 \r\n")
                    f.readline()
                sock.sendall(b"235 2.7.0 ok\r\n")
            elif verb == b"DATA":
                sock.sendall(b"354 go on\r\n")
                while (data := f.readline()) and data.rstrip(b"\r\n") != b".":
                    pass
                sock.sendall(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                sock.sendall(b"221 2.0.0 bye\r\n")
                return
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                sock.sendall(b"250 ok\r\n")
            else:
                sock.sendall(b"502 5.5.2 no\r\n")


def _client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def python_smtplib(port: int, work: Path) -> None:
    """As an application sends with smtplib: one context, two connections."""
    import smtplib

    ctx = _client_context()
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            smtp.starttls(context=ctx)
            smtp.login(USER, PASSWORD)
            smtp.sendmail(MAIL_FROM, [RCPT], MESSAGE)


def python_ssl_session(port: int, work: Path) -> None:
    """The control: Python's ssl given the previous connection's session."""
    ctx = _client_context()
    session: ssl.SSLSession | None = None
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), 20) as raw:
            f = raw.makefile("rb")
            for command in (None, b"EHLO bench\r\n", b"STARTTLS\r\n"):
                if command:
                    raw.sendall(command)
                while f.readline()[3:4] == b"-":
                    pass
            tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
            g = tls.makefile("rb")
            tls.sendall(b"EHLO bench\r\n")
            while g.readline()[3:4] == b"-":
                pass
            tls.sendall(b"QUIT\r\n")
            g.readline()
            session = tls.session  # with its TLS 1.3 ticket, read with the replies


def _run(argv: list[str], stdin: bytes = b"", ok: Callable[[bytes, int], bool] | None = None,
         ) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=60)
    if not (ok(done.stdout, done.returncode) if ok else done.returncode == 0):
        raise RuntimeError((done.stdout + done.stderr).decode(errors="replace")[-300:])


def openssl_sess(port: int, work: Path) -> None:
    """The control: openssl s_client saving and offering the session."""
    store = work / "openssl.session"
    for flag in ("-sess_out", "-sess_in"):
        # Its exit status is 1 when the server closes without close_notify.
        _run(["openssl", "s_client", "-quiet", "-crlf", "-starttls", "smtp", "-connect",
              f"127.0.0.1:{port}", flag, str(store)], b"EHLO bench\nQUIT\n",
             ok=lambda out, _: b"221 " in out)


def curl(port: int, work: Path) -> None:
    (work / "message.eml").write_text(MESSAGE)
    for _ in range(2):
        _run(["curl", "-sS", "--url", f"smtp://127.0.0.1:{port}", "--ssl-reqd", "-k",
              "--mail-from", MAIL_FROM, "--mail-rcpt", RCPT, "--user", f"{USER}:{PASSWORD}",
              "-T", str(work / "message.eml")])


def swaks(port: int, work: Path) -> None:
    for _ in range(2):
        _run(["swaks", "--server", "127.0.0.1", "--port", str(port), "--tls", "--auth",
              "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD, "--from", MAIL_FROM,
              "--to", RCPT, "--body", "hello", "--silent", "2"])


def msmtp(port: int, work: Path) -> None:
    for _ in range(2):
        _run(["msmtp", "--host=127.0.0.1", f"--port={port}", "--tls=on", "--tls-starttls=on",
              "--tls-certcheck=off", "--auth=plain", f"--user={USER}",
              f"--passwordeval=echo {PASSWORD}", f"--from={MAIL_FROM}", "--", RCPT],
             MESSAGE.encode())


PHP_SCRIPT = r"""<?php
require $argv[1];
use PHPMailer\PHPMailer\PHPMailer;
$c = json_decode($argv[2], true);
for ($i = 0; $i < 2; $i++) {
    $mail = new PHPMailer(true);
    $mail->isSMTP();
    $mail->Host = '127.0.0.1';
    $mail->Port = $c['port'];
    $mail->SMTPSecure = PHPMailer::ENCRYPTION_STARTTLS;
    $mail->SMTPAuth = true;
    $mail->Username = $c['user'];
    $mail->Password = $c['pass'];
    $mail->SMTPOptions = ['ssl' => ['verify_peer' => false, 'verify_peer_name' => false,
                                    'allow_self_signed' => true]];
    $mail->setFrom($c['from']);
    $mail->addAddress($c['to']);
    $mail->Subject = 'resumption';
    $mail->Body = 'hello';
    $mail->send();
}
"""


def phpmailer(port: int, work: Path) -> None:
    script = work / "send.php"
    script.write_text(PHP_SCRIPT)
    _run(["php", str(script), str(PHPMAILER), json.dumps(
        {"port": port, "user": USER, "pass": PASSWORD, "from": MAIL_FROM, "to": RCPT})])


NODE_SCRIPT = r"""
const nodemailer = require(process.argv[2])
const port = Number(process.argv[3])
const t = nodemailer.createTransport({
    host: '127.0.0.1', port, secure: false, requireTLS: true,
    auth: { user: process.argv[4], pass: process.argv[5] }, tls: { rejectUnauthorized: false },
})
;(async () => {
    for (let i = 0; i < 2; i++) {
        await t.sendMail({ from: process.argv[6], to: process.argv[7], subject: 'resumption',
                           text: 'hello' })
    }
    t.close()
})().catch((e) => { console.error(e); process.exit(1) })
"""


def nodemailer(port: int, work: Path) -> None:
    script = work / "send.js"
    script.write_text(NODE_SCRIPT)
    _run(["node", str(script), str(NODEMAILER), str(port), USER, PASSWORD, MAIL_FROM, RCPT])


@dataclass
class Client:
    name: str
    how: str
    run: Callable[[int, Path], None]
    #: Why it cannot run here (None: it can).
    missing: Callable[[], str | None]


def _need(*commands: str) -> Callable[[], str | None]:
    def check() -> str | None:
        gone = [c for c in commands if shutil.which(c) is None]
        return f"not installed ({', '.join(gone)})" if gone else None
    return check


def _need_file(command: str, path: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        return _need(command)() or (None if path.exists() else f"not installed ({path})")
    return check


CLIENTS = [
    Client("Python smtplib", "one process, two SMTP() connections, one SSLContext",
           python_smtplib, lambda: None),
    Client("curl", "run twice", curl, _need("curl")),
    Client("swaks", "run twice", swaks, _need("swaks")),
    Client("msmtp", "run twice", msmtp, _need("msmtp")),
    Client("PHPMailer (php-cli)", "one process, two PHPMailer sends", phpmailer,
           _need_file("php", PHPMAILER)),
    Client("Nodemailer (Node)", "one process, one transport (not pooled), two sendMail",
           nodemailer, _need_file("node", NODEMAILER)),
    Client("Postfix", "-", lambda port, work: None,
           lambda: ("present, not measured here (it needs a configured instance)"
                    if shutil.which("postfix") or Path("/usr/sbin/postfix").exists()
                    else "not installed")),
    Client("control: Python ssl, session=", "the first connection's session passed back",
           python_ssl_session, lambda: None),
    Client("control: openssl s_client", "-sess_out, then -sess_in", openssl_sess,
           _need("openssl")),
]


VERSIONS = {"TLS 1.3": ssl.TLSVersion.TLSv1_3, "TLS 1.2": ssl.TLSVersion.TLSv1_2}


def measure(cert: Path, key: Path, work: Path) -> list[tuple[str, str, list[str], str]]:
    """(client, how, result per TLS version, detail) per client: the server
    is run once up to TLS 1.3 (tickets) and once up to TLS 1.2 (session ids
    and tickets)."""
    out = []
    for client in CLIENTS:
        why = client.missing()
        if why is not None:
            short = why.split(" (")[0] if why.startswith("not installed") else "-"
            out.append((client.name, client.how, [short] * len(VERSIONS), why))
            continue
        results, details = [], []
        for name, version in VERSIONS.items():
            server = SMTPServer(cert, key, version)
            try:
                client.run(server.port, work)
                seen = list(server.seen.connections)
                hits = server.ctx.session_stats()["hits"]
            except Exception as e:  # any failure is the row's answer
                results.append("failed")
                details.append(f"{name}: {type(e).__name__}: {e}"[:200].replace("\n", " "))
                continue
            finally:
                server.close()
            resumed = sum(1 for _, r in seen[1:] if r)
            results.append("resumes" if resumed else "does not")
            details.append(f"{name}: {resumed} of {len(seen)} resumed (cache hits {hits})")
        out.append((client.name, client.how, results, "; ".join(details)))
    return out


def table(results: list[tuple[str, str, list[str], str]]) -> str:
    lines = [f"| client | how it sends two messages | {' | '.join(VERSIONS)} | "
             "what the server saw |",
             "|---|---|" + "---|" * len(VERSIONS) + "---|"]
    lines += [f"| {name} | {how} | {' | '.join(res)} | {detail} |"
              for name, how, res, detail in results]
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mxmrelay-resumption-") as folder:
        work = Path(folder)
        cert, key = procs.make_certificate(work)
        print("TLS session resumption across connections, per client "
              f"(OpenSSL {ssl.OPENSSL_VERSION}):")
        print(table(measure(cert, key, work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
