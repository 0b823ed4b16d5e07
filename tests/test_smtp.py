"""The SMTP front over real loopback sockets with real TLS: ordering,
STARTTLS, AUTH, the envelope, and the replies to bad input."""

from __future__ import annotations

import base64
import ssl

from twisted.internet.defer import Deferred, fail
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer, provider

from mxmrelay.auth import DirectoryChecker
from mxmrelay.directory import DirectoryError, IDirectory, User
from tests.support import RawClient, RelayUnderTest, in_thread


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class PlainPhase(unittest.TestCase):
    """Before STARTTLS on the 587 and 25 roles."""

    async def test_ehlo_before_tls(self) -> None:
        relay = RelayUnderTest(self)

        def talk(role: str) -> tuple[str, str]:
            c = relay.raw(role)
            try:
                return c.greeting, c.cmd("EHLO client.test")
            finally:
                c.close()

        for role in ("submission", "smtp"):
            greeting, ehlo = await in_thread(talk, role)
            self.assertTrue(greeting.startswith("220 relay.test "), greeting)
            lines = ehlo.split("\n")
            self.assertTrue(any(x[4:] == "STARTTLS" for x in lines), lines)
            self.assertNotIn("AUTH", ehlo)
            for ext in ("PIPELINING", "SIZE 26214400", "8BITMIME", "SMTPUTF8",
                        "ENHANCEDSTATUSCODES"):
                self.assertTrue(any(x[4:] == ext for x in lines), (ext, lines))

    async def test_commands_need_tls(self) -> None:
        relay = RelayUnderTest(self)

        def talk() -> list[str]:
            c = relay.raw("smtp")
            c.cmd("EHLO client.test")
            out = [c.cmd(x) for x in ("AUTH PLAIN " + b64("\0demo@example.com\0demo-password"),
                                     "MAIL FROM:<app@example.com>",
                                     "RCPT TO:<a@example.org>", "DATA")]
            c.close()
            return out

        for answer in await in_thread(talk):
            self.assertEqual(answer, "530 5.7.0 Must issue a STARTTLS command first")

    async def test_starttls_argument_and_inside_tls(self) -> None:
        relay = RelayUnderTest(self)

        def talk() -> tuple[str, str, str, str]:
            c = relay.raw()
            c.cmd("EHLO client.test")
            with_arg = c.cmd("STARTTLS now")
            c.starttls()
            ehlo = c.cmd("EHLO client.test")
            again = c.cmd("STARTTLS")
            i = relay.raw("smtps")
            implicit = i.cmd("EHLO client.test") + "\n" + i.cmd("STARTTLS")
            c.close()
            i.close()
            return with_arg, ehlo, again, implicit

        with_arg, ehlo, again, implicit = await in_thread(talk)
        self.assertEqual(with_arg, "501 5.5.4 Syntax: STARTTLS")
        self.assertNotIn("STARTTLS", ehlo)
        self.assertIn("250-AUTH PLAIN LOGIN", ehlo)
        self.assertEqual(again, "503 5.5.1 TLS already active")
        self.assertNotIn("250-STARTTLS", implicit)
        self.assertTrue(implicit.endswith("503 5.5.1 TLS already active"))

    async def test_starttls_injection_discarded(self) -> None:
        """Commands pipelined after STARTTLS in plain text never run."""
        relay = RelayUnderTest(self)

        def talk() -> tuple[str, str, str]:
            c = relay.raw()
            c.cmd("EHLO client.test")
            c.send(b"STARTTLS\r\nRSET\r\nNOOP injected\r\nQUIT\r\n")
            ready = c.reply()
            c.sock = c.context.wrap_socket(c.sock, server_hostname="localhost")
            # State is reset: MAIL needs a new EHLO; and nothing injected
            # is answered before what we send now.
            first = c.cmd("MAIL FROM:<app@example.com>")
            second = c.cmd("NOOP")
            c.close()
            return ready, first, second

        ready, first, second = await in_thread(talk)
        self.assertEqual(ready, "220 2.0.0 Ready to start TLS")
        self.assertEqual(first, "503 5.5.1 Error: send HELO/EHLO first")
        self.assertEqual(second, "250 2.0.0 Ok")

    async def test_tls_client_hello_on_starttls_port(self) -> None:
        relay = RelayUnderTest(self)

        def talk() -> bool:
            c = relay.raw()
            c.send(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 32)
            return c.closed()

        self.assertTrue(await in_thread(talk))

    async def test_plaintext_on_implicit_tls_port(self) -> None:
        relay = RelayUnderTest(self)

        def talk() -> tuple[bytes, bool]:
            import socket

            s = socket.create_connection(("127.0.0.1", relay.ports["smtps"]), timeout=10)
            s.sendall(b"EHLO client.test\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            s.close()
            return data, True

        data, closed = await in_thread(talk)
        self.assertTrue(data.startswith(b"554 5.7.0 "), data)
        self.assertIn(b"587", data)
        self.assertTrue(closed)

    async def test_old_tls_versions_refused(self) -> None:
        relay = RelayUnderTest(self)

        def handshake(version: ssl.TLSVersion) -> str:
            ctx = relay.client_context()
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = version
            try:
                c = RawClient(relay.ports["smtps"], ctx, tls=True)
            except (ssl.SSLError, ConnectionError, OSError):
                return "refused"
            version_name = c.sock.version()  # type: ignore[attr-defined]
            c.close()
            return str(version_name)

        self.assertEqual(await in_thread(handshake, ssl.TLSVersion.TLSv1_3), "TLSv1.3")
        self.assertEqual(await in_thread(handshake, ssl.TLSVersion.TLSv1_2), "TLSv1.2")
        self.assertEqual(await in_thread(handshake, ssl.TLSVersion.TLSv1_1), "refused")


class Authentication(unittest.TestCase):
    async def test_mechanisms(self) -> None:
        """PLAIN and LOGIN, with and without an initial response, in the
        spellings real clients use."""
        relay = RelayUnderTest(self)
        user, pw = "demo@example.com", "demo-password"
        exchanges = [
            [f"AUTH PLAIN {b64(chr(0) + user + chr(0) + pw)}"],
            ["AUTH PLAIN", b64(f"\0{user}\0{pw}")],
            [f"auth plain {b64(user + chr(0) + user + chr(0) + pw)}"],
            ["AUTH LOGIN", b64(user), b64(pw)],
            [f"AUTH login {b64(user)}", b64(pw)],  # .NET SmtpClient
            [f"AUTH LOGIN {b64(user.upper())}", b64(pw)],
        ]

        def talk(steps: list[str]) -> list[str]:
            c = relay.raw().ready(login=False)
            answers = [c.cmd(s) for s in steps]
            c.close()
            return answers

        for steps in exchanges:
            answers = await in_thread(talk, steps)
            self.assertEqual(answers[-1], "235 2.7.0 Authentication successful", steps)
            for a in answers[:-1]:
                self.assertTrue(a.startswith("334 "), (steps, answers))
        login = await in_thread(talk, ["AUTH LOGIN", b64(user), b64(pw)])
        self.assertEqual(login[:2], ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"])

    async def test_malformed_exchanges(self) -> None:
        relay = RelayUnderTest(self)
        cases = [
            (["AUTH"], "501 5.5.4 Syntax: AUTH mechanism"),
            (["AUTH CRAM-MD5"], "504 5.5.4 Unrecognized authentication type"),
            (["AUTH PLAIN !!!notbase64"], "501 5.5.2 Cannot decode response"),
            (["AUTH PLAIN", "*"], "501 5.7.0 Authentication aborted"),
            (["AUTH LOGIN", "*"], "501 5.7.0 Authentication aborted"),
            (["AUTH LOGIN", b64("demo@example.com"), "a b c"], "501 5.5.2 Cannot decode response"),
            ([f"AUTH PLAIN {b64('no-nul-separators')}"], "501 5.5.2 Cannot decode response"),
            (["AUTH PLAIN", "A" * 13000], "500 5.5.6 Authentication exchange line is too long"),
            ([f"AUTH PLAIN {b64(chr(0) + 'demo@example.com' + chr(0) + 'demo-password')}",
              "AUTH PLAIN x"], "503 5.5.1 Already authenticated"),
            ([f"AUTH PLAIN {b64('ops@acme.test' + chr(0) + 'demo@example.com' + chr(0))}"
              "ZGVtby1wYXNzd29yZA=="], "501 5.5.2 Cannot decode response"),
            ([f"AUTH PLAIN {b64(chr(0).join(['ops@acme.test', 'demo@example.com', 'pw']))}"],
             "535 5.7.8 Authentication credentials invalid"),
            (["MAIL FROM:<app@example.com>"], "530 5.7.0 Authentication required"),
        ]

        def talk(steps: list[str]) -> tuple[str, str]:
            c = relay.raw().ready(login=False)
            answers = [c.cmd(s) for s in steps]
            after = c.cmd("NOOP")
            c.close()
            return answers[-1], after

        for steps, expected in cases:
            last, after = await in_thread(talk, steps)
            self.assertEqual(last, expected, steps[0][:40])
            self.assertEqual(after, "250 2.0.0 Ok")

    async def test_bad_credentials_same_reply_then_421(self) -> None:
        relay = RelayUnderTest(self)

        def talk() -> tuple[list[str], bool]:
            c = relay.raw().ready(login=False)
            answers = [c.login("demo@example.com", "wrong"),
                       c.login("nobody@example.com", "wrong"),
                       c.login("demo@example.com", "wrong-again")]
            return answers, c.closed()

        messages: list[str] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            fmt = event.get("log_format") or ""
            if fmt.startswith("auth failure"):
                messages.append(fmt.format(**event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        answers, closed = await in_thread(talk)
        self.assertEqual(answers[:2], ["535 5.7.8 Authentication credentials invalid"] * 2)
        self.assertEqual(answers[2], "421 4.7.0 Too many authentication failures")
        self.assertTrue(closed)
        self.assertEqual(messages[0], "auth failure rhost=127.0.0.1 user=demo@example.com")
        self.assertTrue(all("wrong" not in m for m in messages))

    async def test_rate_limit_across_connections(self) -> None:
        relay = RelayUnderTest(self, auth={"max_failures_per_connection": 10,
                                           "max_failures_per_user": 2,
                                           "max_failures_per_address": 4})

        def talk() -> list[str]:
            out = []
            c = relay.raw().ready(login=False)
            out.append(c.login("demo@example.com", "bad1"))
            c.close()
            c = relay.raw().ready(login=False)
            out.append(c.login("demo@example.com", "bad2"))
            # The user is now limited: even the right password is not checked.
            out.append(c.login("demo@example.com", "demo-password"))
            out.append(c.login("ops@acme.test", "bad3"))
            out.append(c.login("ops@acme.test", "bad4"))
            # The address is now limited, for every user.
            out.append(c.login("ops@acme.test", "acme-password"))
            c.close()
            return out

        self.assertEqual(await in_thread(talk), [
            "535 5.7.8 Authentication credentials invalid",
            "535 5.7.8 Authentication credentials invalid",
            "454 4.7.0 Temporary authentication failure",
            "535 5.7.8 Authentication credentials invalid",
            "535 5.7.8 Authentication credentials invalid",
            "454 4.7.0 Temporary authentication failure",
        ])

    async def test_directory_down(self) -> None:
        relay = RelayUnderTest(self)

        @implementer(IDirectory)
        class Down:
            def find_user(self, email: str) -> Deferred[User | None]:
                return fail(DirectoryError("backend down"))

        checker = relay.relay.settings.portal.checkers[
            next(iter(relay.relay.settings.portal.checkers))]
        assert isinstance(checker, DirectoryChecker)
        checker.directory = Down()

        def talk() -> str:
            c = relay.raw().ready(login=False)
            answer = c.login()
            c.close()
            return answer

        self.assertEqual(await in_thread(talk), "454 4.7.0 Temporary authentication failure")


class Envelope(unittest.TestCase):
    async def test_sender_domains(self) -> None:
        relay = RelayUnderTest(self)

        def talk(user: str, pw: str, sender: str) -> str:
            c = relay.raw().ready(login=False)
            c.login(user, pw)
            answer = c.cmd(f"MAIL FROM:<{sender}>")
            c.close()
            return answer

        ok = "250 2.1.0 Ok"
        self.assertEqual(await in_thread(talk, "demo@example.com", "demo-password",
                                         "app@example.com"), ok)
        self.assertEqual(await in_thread(talk, "demo@example.com", "demo-password",
                                         "App@EXAMPLE.com"), ok)
        self.assertEqual(
            await in_thread(talk, "demo@example.com", "demo-password", "app@acme.test"),
            "553 5.7.1 <app@acme.test>: Sender address rejected: not owned by user "
            "demo@example.com")
        self.assertTrue((await in_thread(talk, "demo@example.com", "demo-password",
                                         "app@mail.example.com")).startswith("553 5.7.1 "))
        self.assertTrue((await in_thread(talk, "ops@acme.test", "acme-password",
                                         "app@example.com")).startswith("553 5.7.1 "))

    async def test_replies_to_bad_input(self) -> None:
        relay = RelayUnderTest(self, max_recipients=2)
        cases = [
            (["RCPT TO:<a@example.org>"], "503 5.5.1 Error: need MAIL command"),
            (["DATA"], "503 5.5.1 Error: need MAIL command"),
            (["MAIL FROM:<app@example.com>", "DATA"], "503 5.5.1 Error: need RCPT command"),
            (["MAIL FROM:<app@example.com>", "MAIL FROM:<app@example.com>"],
             "503 5.5.1 Error: nested MAIL command"),
            (["MAIL FROM:<app@@example.com>"], "501 5.1.7 Bad sender address syntax"),
            (["MAIL FROM:<app@example.com> FOO=1"], "555 5.5.4 Unsupported option: FOO"),
            (["MAIL FROM:<app@example.com> SIZE=999999999"],
             "552 5.3.4 Message size exceeds fixed maximum message size"),
            (["MAIL FROM:<app@example.com> SIZE=12k"], "501 5.5.4 Bad message size syntax"),
            (["MAIL FROM:<jörg@example.com>"],
             "553 5.6.7 Must declare SMTPUTF8 to send unicode address"),
            (["MAIL FROM:<jörg@example.com> SMTPUTF8"], "250 2.1.0 Ok"),
            (["MAIL FROM:<app@example.com>", "RCPT TO:<jörg@example.org>"],
             "553 5.6.7 Must declare SMTPUTF8 to send unicode address"),
            (["MAIL FROM:<app@example.com>", "RCPT TO:<a b@example.org>"],
             "501 5.1.3 Bad recipient address syntax"),
            (["MAIL FROM:<app@example.com>", f"RCPT TO:<{'a' * 65}@example.org>"],
             "501 5.1.3 Bad recipient address syntax"),
            (["MAIL FROM:<app@example.com>", "RCPT TO:<a@example.org> NOTIFY=NEVER"],
             "555 5.5.4 Unsupported option: NOTIFY"),
            (["MAIL FROM:<app@example.com>", "RCPT TO:<a@example.org>",
              "RCPT TO:<b@example.org>", "RCPT TO:<c@example.org>"],
             "452 4.5.3 Too many recipients"),
            (["MAIL FROM:<app@example.com>", "RCPT TO:<a@example.org>", "DATA x"],
             "501 5.5.4 Syntax: DATA"),
            (["NOOP"], "250 2.0.0 Ok"),
            (["RSET"], "250 2.0.0 Ok"),
            (["VRFY someone"], "252 2.5.0 Cannot VRFY user"),
            (["HELP"], None),
            (["EHLO"], "501 5.5.4 Syntax: EHLO hostname"),
            (["WHAT"], "500 5.5.2 Command not recognized"),
            (["NOOP " + "x" * 600], "500 5.5.2 Line too long"),
            ([b"MAIL FROM:<app\xff@example.com>"], "501 5.5.2 Invalid UTF-8 in command"),
        ]

        def talk(steps: list[str | bytes]) -> tuple[str, str]:
            c = relay.raw().ready()
            answers = [c.cmd(s) for s in steps]
            # the session goes on, and the transaction can start over
            c.cmd("RSET")
            after = c.cmd("MAIL FROM:<app@example.com>")
            c.close()
            return answers[-1], after

        for steps, expected in cases:
            last, after = await in_thread(talk, steps)
            if expected is None:
                self.assertTrue(last.startswith("214 2.0.0 "), last)
            else:
                self.assertEqual(last, expected, steps)
            self.assertEqual(after, "250 2.1.0 Ok", steps)

    async def test_unknown_commands_then_421(self) -> None:
        relay = RelayUnderTest(self)

        def talk() -> tuple[list[str], bool]:
            c = relay.raw()
            answers = [c.cmd(f"GET /{i} HTTP/1.1") for i in range(5)]
            return answers, c.closed()

        answers, closed = await in_thread(talk)
        self.assertEqual(answers[:4], ["500 5.5.2 Command not recognized"] * 4)
        self.assertEqual(answers[4], "421 4.7.0 Too many unrecognized commands")
        self.assertTrue(closed)

    async def test_endless_line_is_bounded(self) -> None:
        """(A line past 64 KiB closes the connection: see
        tests.test_protocol_limits.)"""
        relay = RelayUnderTest(self)

        def talk() -> tuple[str, str]:
            c = relay.raw()
            c.send(b"NOOP " + b"x" * 60_000)
            c.send(b"\r\n")
            first = c.reply()
            second = c.cmd("NOOP")
            c.close()
            return first, second

        first, second = await in_thread(talk)
        self.assertEqual(first, "500 5.5.2 Line too long")
        self.assertEqual(second, "250 2.0.0 Ok")
        for factory in relay.relay.factories:
            for connection in factory.connections:
                self.assertLess(len(connection._buffer), 20_000)

    async def test_quit(self) -> None:
        relay = RelayUnderTest(self)

        def talk() -> tuple[str, bool]:
            c = relay.raw()
            return c.cmd("QUIT"), c.closed()

        self.assertEqual(await in_thread(talk), ("221 2.0.0 Bye", True))

    async def test_pipelined_replies_in_order(self) -> None:
        """Asynchronous answers (AUTH, MAIL) hold later commands back, so
        replies come in order (the Twisted #8126 class of bug)."""
        relay = RelayUnderTest(self)

        def talk() -> list[str]:
            c = relay.raw().ready(login=False)
            token = b64("\0demo@example.com\0demo-password")
            c.send(f"AUTH PLAIN {token}\r\nMAIL FROM:<app@example.com>\r\n"
                   "RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRSET\r\n"
                   "MAIL FROM:<x@acme.test>\r\nNOOP\r\n".encode())
            answers = [c.reply() for _ in range(7)]
            c.close()
            return answers

        self.assertEqual(await in_thread(talk), [
            "235 2.7.0 Authentication successful", "250 2.1.0 Ok", "250 2.1.5 Ok",
            "250 2.1.5 Ok", "250 2.0.0 Ok",
            "553 5.7.1 <x@acme.test>: Sender address rejected: not owned by user "
            "demo@example.com",
            "250 2.0.0 Ok"])


class Connections(unittest.TestCase):
    async def test_too_many_from_one_address(self) -> None:
        relay = RelayUnderTest(self, max_connections_per_address=2)

        def talk() -> tuple[str, bool, str]:
            a, b = relay.raw(), relay.raw()
            c = relay.raw()
            refused, closed = c.greeting, c.closed()
            a.close()
            # the count goes down as connections close
            answer = ""
            for _ in range(100):
                d = relay.raw()
                answer = d.greeting
                d.close()
                if answer.startswith("220"):
                    break
            b.close()
            return refused, closed, answer

        refused, closed, answer = await in_thread(talk)
        self.assertEqual(refused, "421 4.7.0 Too many connections from your address")
        self.assertTrue(closed)
        self.assertTrue(answer.startswith("220 "), answer)

    async def test_proxy_protocol_endpoint(self) -> None:
        """``haproxy:tcp:...`` endpoints work without code changes: the
        client address is the one the load balancer reports."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        from tests.support import fetch_json, message

        relay = RelayUnderTest(self)
        endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
        port = await endpoint.listen(relay.relay.factory("submission", proxied=True))
        self.addCleanup(port.stopListening)

        def talk() -> str:
            import socket

            s = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
            s.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 587\r\n")
            c = RawClient.__new__(RawClient)
            c.context, c.sock, c._buf = relay.client_context(), s, b""
            c.greeting = c.reply()
            c.ready()
            c.cmd("MAIL FROM:<app@example.com>")
            c.cmd("RCPT TO:<a@example.org>")
            c.cmd("DATA")
            answer = c.cmd(message(to="a@example.org") + b".")
            c.close()
            return answer

        answer = (await in_thread(talk)).split("\n")[-1]  # the decision lines before it
        self.assertTrue(answer.startswith("250 "), answer)
        assert relay.api is not None
        stored = await fetch_json(f"{relay.api.url}/{answer.split()[-1]}")
        self.assertEqual(stored["client"]["address"], "192.0.2.7")
        self.assertIn(stored["client"]["tls_version"], ("TLSv1.2", "TLSv1.3"))

    async def test_proxied_connections_count_per_real_client(self) -> None:
        """Behind a load balancer the per-address limit applies to each real
        client, not to the balancer (idle connections included)."""
        import socket

        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        relay = RelayUnderTest(self, max_connections_per_address=2)
        endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
        port = await endpoint.listen(relay.relay.factory("submission", proxied=True))
        self.addCleanup(port.stopListening)

        def talk() -> list[str]:
            socks, answers = [], []
            for i in range(4):  # three idle clients, then one that talks
                s = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
                s.sendall(f"PROXY TCP4 192.0.2.{i} 127.0.0.1 40000 587\r\n".encode())
                socks.append(s)
            c = RawClient.__new__(RawClient)
            c.context, c.sock, c._buf = relay.client_context(), socks[-1], b""
            answers.append(c.reply())
            answers.append(c.cmd("NOOP"))
            for s in socks:
                s.close()
            return answers

        self.assertEqual(await in_thread(talk), [
            "220 relay.test ESMTP ready", "250 2.0.0 Ok"])


class LogSafety(unittest.TestCase):
    async def test_user_name_cannot_forge_log_lines(self) -> None:
        from twisted.logger import formatEvent

        relay = RelayUnderTest(self)
        lines: list[str] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        forged = "x\nauth failure rhost=203.0.113.9 user=y"

        def talk() -> list[str]:
            c = relay.raw().ready(login=False)
            answers = [c.login(forged, "pw"),
                       c.cmd("AUTH LOGIN " + b64(forged)),
                       c.cmd("AUTH LOGIN"), c.cmd(b64(forged)),
                       c.login("ordinary@example.com\u2028x", "pw")]
            c.close()
            return answers

        refused = "501 5.5.2 Cannot decode response"
        self.assertEqual(await in_thread(talk), [refused, refused, "334 VXNlcm5hbWU6",
                                                 refused, refused])
        self.assertFalse([x for x in lines if "203.0.113.9" in x])


class BackPressure(unittest.TestCase):
    async def test_client_that_does_not_read_its_replies(self) -> None:
        """Pipelined commands from a client that never reads: the relay
        stops answering and reading when its write buffer is full, memory
        stays bounded, and every command is answered once the client reads."""
        import socket

        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        relay = RelayUnderTest(self)
        sock = socket.socket()
        self.addCleanup(sock.close)
        # Small socket buffers on both sides, so that the relay's own write
        # buffer is what fills (loopback would otherwise absorb megabytes).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        await in_thread(sock.connect, ("127.0.0.1", relay.ports["submission"]))
        deadline = reactor.seconds() + 10
        conns: list = []  # type: ignore[type-arg]
        while not conns and reactor.seconds() < deadline:
            conns = [c for f in relay.relay.factories for c in f.connections]
            await deferLater(reactor, 0.01)
        [conn] = conns
        conn.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        def flood() -> int:
            sock.settimeout(1.0)
            sent, chunk = 0, b"NOOP\r\n" * 10_000
            try:
                while sent < 100 * len(chunk):
                    sent += sock.send(chunk)
            except TimeoutError:
                pass
            return sent

        sent = await in_thread(flood)
        self.assertLess(sent, 100 * 60_000, "the relay never stopped reading")
        self.assertTrue(conn._reading_paused)
        self.assertTrue(conn._write_blocked)
        self.assertLess(len(conn._buffer) - conn._pos, 200_000)

        def drain() -> int:
            sock.settimeout(10)
            data = b""
            while data.count(b"\r\n") < 1 + sent // 6:
                data += sock.recv(1 << 20)
            return data.count(b"250 2.0.0 Ok\r\n")

        self.assertEqual(await in_thread(drain), sent // 6)
