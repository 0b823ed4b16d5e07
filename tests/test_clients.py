"""swaks and curl, the clients customers and operators really use, against
a relay in this process (real TLS on loopback, the real reference API).

The clients run under the reactor (``getProcessOutputAndValue``), never
blocking, since the relay under test shares it.
"""

from __future__ import annotations

from twisted.trial import unittest

from tests.helpers import folder_for, need, queued, queued_id, run
from tests.process_support import DEMO
from tests.support import RelayUnderTest, fetch_json, message


class Swaks(unittest.TestCase):
    def setUp(self) -> None:
        self.swaks = need("swaks")
        self.relay = RelayUnderTest(self)

    async def swaks_run(self, role: str, *args: str, password: str = DEMO[1],
                        auth: bool = True) -> tuple[str, int]:
        argv = ["--server", f"127.0.0.1:{self.relay.ports[role]}", "--timeout", "20",
                "--from", "app@example.com", "--to", "someone@example.org",
                "--header", "X-Mxm-Tag: swaks,test", *args]
        if auth:
            argv += ["--auth-user", DEMO[0], "--auth-password", password]
        return await run(self.swaks, *argv)

    async def assert_stored(self, output: str, listener: str) -> None:
        send_id = queued_id(output)
        assert self.relay.api is not None
        stored = await fetch_json(f"{self.relay.api.url}/{send_id}")
        self.assertEqual(stored["id"], send_id)
        self.assertEqual(stored["tags"], ["swaks", "test"])
        self.assertEqual(stored["mail_from"], "app@example.com")
        self.assertEqual(stored["to"], "someone@example.org")
        self.assertEqual(stored["client"]["listener"], listener)
        self.assertIn(stored["client"]["tls_version"], ("TLSv1.2", "TLSv1.3"))

    async def test_starttls_roles(self) -> None:
        for role in ("submission", "smtp"):
            output, code = await self.swaks_run(role, "--tls")
            self.assertEqual(code, 0, output)
            await self.assert_stored(output, role)

    async def test_smtps(self) -> None:
        output, code = await self.swaks_run("smtps", "--tlsc")
        self.assertEqual(code, 0, output)
        await self.assert_stored(output, "smtps")

    async def test_wrong_password(self) -> None:
        output, code = await self.swaks_run("submission", "--tls", password="wrong-password")
        self.assertNotEqual(code, 0, output)
        self.assertIn("535 5.7.8", output)
        self.assertIsNone(queued().search(output), output)

    async def test_foreign_sender_domain(self) -> None:
        output, code = await self.swaks_run("submission", "--tls", "--from", "x@acme.test")
        self.assertNotEqual(code, 0, output)
        self.assertIn("553 5.7.1", output)

    async def test_plaintext(self) -> None:
        # AUTH is not even offered before STARTTLS, so a client that insists
        # on authenticating gives up...
        output, code = await self.swaks_run("submission")
        self.assertNotEqual(code, 0, output)
        self.assertNotRegex(output, r"250[ -]AUTH")
        # ...and one that goes on without meets 530 at MAIL.
        output, code = await self.swaks_run("submission", "--auth-optional")
        self.assertNotEqual(code, 0, output)
        self.assertIn("530 5.7.0", output)
        self.assertIsNone(queued().search(output), output)


class Curl(unittest.TestCase):
    def setUp(self) -> None:
        self.curl = need("curl")
        self.relay = RelayUnderTest(self)
        self.folder = folder_for(self)

    async def curl_send(self, scheme: str, role: str, subject: str,
                        *tls: str) -> tuple[str, int]:
        port = self.relay.ports[role]
        msg = self.folder / f"{subject}.eml"
        msg.write_bytes(message(subject=subject, sender="app@example.com",
                                extra=f"X-Mxm-Tag: curl,{scheme}\r\n"))
        return await run(
            self.curl, "--silent", "--show-error", "--verbose", "--max-time", "20",
            f"{scheme}://localhost:{port}", "--resolve", f"localhost:{port}:127.0.0.1",
            *tls, "--mail-from", "app@example.com", "--mail-rcpt", "someone@example.org",
            "--upload-file", msg, "-u", f"{DEMO[0]}:{DEMO[1]}")

    async def assert_stored(self, output: str, tags: list[str], listener: str) -> None:
        send_id = queued_id(output)
        assert self.relay.api is not None
        stored = await fetch_json(f"{self.relay.api.url}/{send_id}")
        self.assertEqual(stored["id"], send_id)
        self.assertEqual(stored["tags"], tags)
        self.assertEqual(stored["client"]["listener"], listener)

    async def test_starttls(self) -> None:
        output, code = await self.curl_send("smtp", "submission", "curl-starttls", "--ssl-reqd",
                                            "--cacert", str(self.relay.ca_file))
        self.assertEqual(code, 0, output)
        await self.assert_stored(output, ["curl", "smtp"], "submission")

    async def test_smtps(self) -> None:
        output, code = await self.curl_send("smtps", "smtps", "curl-smtps",
                                            "--cacert", str(self.relay.ca_file))
        self.assertEqual(code, 0, output)
        await self.assert_stored(output, ["curl", "smtps"], "smtps")

    async def test_certificate_is_verified(self) -> None:
        # Without the CA, curl refuses the self-signed certificate: the relay
        # really presents it, and nothing is sent.
        output, code = await self.curl_send("smtp", "submission", "curl-unverified",
                                            "--ssl-reqd")
        self.assertEqual(code, 60, output)
        self.assertIsNone(queued().search(output), output)
