"""The test harness: a real relay on loopback, with real TLS, in front of
the real reference delivery API over real HTTP; and blocking clients run
on threads (smtplib, raw sockets), so the reactor serves while they talk.
"""

from __future__ import annotations

import datetime
import json
import re
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from mxmrelay.auth import hash_password
from mxmrelay.config import Config
from mxmrelay.directory import TomlDirectory
from mxmrelay.forwarder import Forwarder
from mxmrelay.service import Relay
from mxmrelay_refapi.api import ReferenceAPI
from tests.helpers import listen

T = TypeVar("T")

TOKEN = "test-token"
PASSWORDS = {"demo@example.com": "demo-password", "ops@acme.test": "acme-password"}

# A cheap scrypt cost for tests: the hash parameters travel in the hash.
_HASHES = {email: hash_password(pw, n=2**10) for email, pw in PASSWORDS.items()}


def directory() -> TomlDirectory:
    return TomlDirectory.from_dict({
        "customer": [
            {"id": "demo", "name": "Demo", "domains": ["example.com"], "flags": 1,
             "from_flags": {"news@example.com": 3}},
            {"id": "acme", "name": "Acme", "domains": ["acme.test"], "flags": 0},
        ],
        "user": [
            {"email": "demo@example.com", "password": _HASHES["demo@example.com"],
             "customer": "demo"},
            {"email": "ops@acme.test", "password": _HASHES["ops@acme.test"],
             "customer": "acme"},
        ],
    }, "test directory")


def make_certificate(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed EC certificate for ``name`` and 127.0.0.1."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def config_dict(folder: Path, api_url: str, **overrides: Any) -> dict[str, Any]:
    cert, key = make_certificate(folder / "tls")
    data: dict[str, Any] = {
        "hostname": "relay.test",
        "directory": "unused.toml",
        "bounce_address": "bounce+{id}@bounces.test",
        "tls": {"certificate": str(cert), "private_key": str(key)},
        "listener": [{"role": r, "endpoint": "tcp:0"} for r in ("smtp", "submission", "smtps")],
        "delivery_api": {"url": api_url, "token": TOKEN, "timeout": 10},
    }
    for key_name, value in overrides.items():
        data[key_name] = value
    return data


class API:
    """The reference delivery API, listening on a loopback port."""

    def __init__(self, testcase: Any, folder: Path) -> None:
        self.api = ReferenceAPI.open(folder / "api.sqlite3", TOKEN, reactor=reactor)
        self.site = self.api.site()
        self.port, number = listen(self.site)
        self.url = f"http://127.0.0.1:{number}/v1/sends"
        self.base = f"http://127.0.0.1:{number}"
        testcase.addCleanup(self.api.close)
        testcase.addCleanup(self.port.stopListening)


class RelayUnderTest:
    """A relay with all three roles listening on loopback ports."""

    def __init__(self, testcase: Any, api_url: str | None = None, **overrides: Any) -> None:
        folder = Path(testcase.mktemp()).resolve()
        folder.mkdir(parents=True)
        self.api: API | None = None
        if api_url is None:
            self.api = API(testcase, folder)
            api_url = self.api.url
        self.config = Config.from_dict(config_dict(folder, api_url, **overrides), folder,
                                       "test config")
        self.ca_file = self.config.tls.certificate
        d = self.config.delivery_api
        assert d is not None
        self.forwarder = Forwarder(reactor, d.url, d.token, d.timeout)
        testcase.addCleanup(self.forwarder.close)
        self.relay = Relay.build(self.config, reactor, self.forwarder, directory())
        self.ports: dict[str, int] = {}
        for role in ("smtp", "submission", "smtps"):
            port, self.ports[role] = listen(self.relay.factory(role))
            testcase.addCleanup(port.stopListening)
        testcase.addCleanup(self._drop_connections)

    def _drop_connections(self) -> None:
        for factory in self.relay.factories:
            for connection in list(factory.connections):
                connection.transport.abortConnection()

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx

    def smtp(self, role: str = "submission", login: tuple[str, str] | None = (
            "demo@example.com", "demo-password")) -> smtplib.SMTP:
        """A blocking smtplib client, TLS up and logged in (call on a thread)."""
        ctx = self.client_context()
        if role == "smtps":
            client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", self.ports[role], timeout=10,
                                                   context=ctx, local_hostname="client.test")
        else:
            client = smtplib.SMTP("127.0.0.1", self.ports[role], timeout=10,
                                  local_hostname="client.test")
            client.starttls(context=ctx)
        if login is not None:
            client.login(*login)
        return client

    def raw(self, role: str = "submission") -> RawClient:
        return RawClient(self.ports[role], self.client_context(), tls=(role == "smtps"))


def in_thread(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """Run a blocking client on a thread; the reactor keeps serving."""
    return deferToThread(f, *args)


class RawClient:
    """A line-level SMTP client over a real socket, for the cases no
    library client can be made to send (injection, pipelining, bad input)."""

    def __init__(self, port: int, context: ssl.SSLContext, tls: bool = False) -> None:
        self.context = context
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock: socket.socket = context.wrap_socket(sock, server_hostname="localhost") if tls \
            else sock
        self._buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self._buf!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        """One whole (possibly multi-line) reply, as text, lines joined by \\n."""
        lines = []
        while True:
            line = self.line()
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def cmd(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self) -> str:
        answer = self.cmd("STARTTLS")
        if answer.startswith("220"):
            self.sock = self.context.wrap_socket(self.sock, server_hostname="localhost")
        return answer

    def login(self, user: str = "demo@example.com", password: str = "demo-password") -> str:
        import base64

        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {token}")

    def ready(self, login: bool = True) -> RawClient:
        """EHLO, STARTTLS (unless implicit), EHLO, AUTH."""
        if not isinstance(self.sock, ssl.SSLSocket):
            assert self.cmd("EHLO client.test").startswith("250")
            assert self.starttls().startswith("220")
        assert self.cmd("EHLO client.test").startswith("250")
        if login:
            assert self.login().startswith("235")
        return self

    def closed(self) -> bool:
        """Has the server closed the connection (after what was read)?"""
        try:
            self.sock.settimeout(10)
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def message(subject: str = "Hello", to: str = "someone@example.org",
            sender: str = '"Shop" <shop@example.com>', extra: str | bytes = "",
            body: str | bytes = "Hi there.\r\n") -> bytes:
    """A small message as an application writes it: From, To, Subject, a
    Message-ID made of the subject, the ``extra`` header lines, ``body``."""
    mid = re.sub(r"\W", ".", subject)
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{mid}@client.test>\r\n").encode()
    return head + _utf8(extra) + b"\r\n" + _utf8(body)


def _utf8(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


async def fetch_json(url: str) -> Any:
    import treq

    response = await treq.get(url, persistent=False)
    return json.loads(await treq.content(response))


async def fetch_bytes(url: str) -> bytes:
    import treq

    response = await treq.get(url, persistent=False)
    data: bytes = await treq.content(response)
    return data
