"""The decision in the reply, end to end: real clients over real TLS on
loopback, the real reference API.  Every client still reads the id (the
last line is unchanged); swaks and curl -v show the lines to their user;
a client that pipelines several transactions gets a multi-line reply for
each, in order; ``explain = false`` gives the one-line reply."""

from __future__ import annotations

import smtplib

from twisted.trial import unittest

from tests import test_compat as compat
from tests.explain_support import QUIET, ExplainRelay
from tests.helpers import folder_for, need, queued_id, run
from tests.support import fetch_json, in_thread, message

DECIDED = ("250-2.0.0 to=<a@example.org>\n"
           "250-2.0.0 bcc=<b@example.org> (no tracking); dropped: 1 recipient, Cc\n"
           '250-2.0.0 from=<app@example.com> "Shop" ; flags=3 (open, click) ; tags=order,x\n')
HEAD_EXTRA = "Cc: c@example.org\r\nX-Mxm-Flags: 3\r\nX-Mxm-Tag: order, x\r\n"


class Pipelining(unittest.TestCase):
    timeout = 30

    async def test_pipelined_transactions_each_get_their_lines(self) -> None:
        """Postfix as a smarthost pipelines MAIL, RCPT and DATA, and then a
        second transaction after the first's end of data; each reply is
        read whole, the id from its last line."""
        relay = ExplainRelay(self)

        def talk() -> list[str]:
            c = relay.raw().ready()
            batch = b""
            for n in range(3):
                batch += (b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.org>\r\n"
                          b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
                batch += message(subject=f"Pipelined {n}", to="a@example.org",
                                 extra=HEAD_EXTRA) + b".\r\n"
            c.send(batch + b"QUIT\r\n")
            answers = [c.reply() for _ in range(3 * 6 + 1)]
            c.close()
            return answers

        answers = await in_thread(talk)
        ids = []
        for n in range(3):
            one = answers[6 * n: 6 * n + 6]
            self.assertEqual(one[:5], ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                                       "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"])
            self.assertTrue(one[5].startswith(DECIDED), one[5])
            ids.append(queued_id(one[5], alone=True))
        self.assertEqual(answers[-1], "221 2.0.0 Bye")
        assert relay.api is not None
        for send_id in ids:
            stored = await fetch_json(f"{relay.api.url}/{send_id}")
            self.assertEqual((stored["to"], stored["bcc"], stored["flags"]),
                             ("a@example.org", "b@example.org", 3))
        self.assertEqual(len(set(ids)), 3)

    async def test_explain_off_is_one_line(self) -> None:
        relay = ExplainRelay(self)

        def talk() -> str:
            c = relay.raw().ready(login=False)
            assert c.login(*QUIET).startswith("235")
            for line in ("MAIL FROM:<app@quiet.test>", "RCPT TO:<a@example.org>", "DATA"):
                c.cmd(line)
            answer = c.cmd(message(to="a@example.org") + b".")
            c.close()
            return answer

        answer = await in_thread(talk)
        self.assertRegex(answer, r"\A250 2\.0\.0 Ok: queued as \S+\Z")

    async def test_dotnet_style_dialogue(self) -> None:
        """.NET's SmtpClient: AUTH LOGIN, one command at a time, and the
        DATA reply read up to its last line (status code from it)."""
        relay = ExplainRelay(self)

        def talk() -> str:
            import base64

            c = relay.raw().ready(login=False)
            b64 = base64.b64encode
            assert c.cmd(b"AUTH login " + b64(b"demo@example.com")).startswith("334")
            assert c.cmd(b64(b"demo-password")).startswith("235")
            for line in ("MAIL FROM:<app@example.com>", "RCPT TO:<a@example.org>", "DATA"):
                c.cmd(line)
            answer = c.cmd(message(to="a@example.org") + b".")
            assert c.cmd("QUIT").startswith("221")
            c.close()
            return answer

        answer = await in_thread(talk)
        self.assertTrue(answer.split("\n")[-1].startswith("250 2.0.0 Ok: queued as "), answer)


class Smtplib(unittest.TestCase):
    async def test_lines_in_the_message(self) -> None:
        """smtplib gives the code and the lines' texts joined; the id is the
        last token as before."""
        relay = ExplainRelay(self)

        def send() -> tuple[int, bytes]:
            client = relay.smtp()
            try:
                client.mail("app@example.com")
                client.rcpt("a@example.org")
                return client.data(message(to="a@example.org"))
            finally:
                client.quit()

        code, text = await in_thread(send)
        self.assertEqual(code, 250)
        lines = text.decode().split("\n")
        self.assertEqual(lines[0], "2.0.0 to=<a@example.org>")
        send_id = lines[-1].split()[-1]
        assert relay.api is not None
        self.assertEqual((await fetch_json(f"{relay.api.url}/{send_id}"))["id"], send_id)
        self.assertIsInstance(smtplib.SMTP, type)


class Shown(unittest.TestCase):
    """The clients that show the lines to their user."""

    async def test_swaks(self) -> None:
        swaks = need("swaks")
        relay = ExplainRelay(self)
        out, code = await run(
            swaks, "--server", f"127.0.0.1:{relay.ports['submission']}", "--tls",
            "--timeout", "20", "--from", "app@example.com", "--to", "a@example.org,b@example.org",
            "--header", "X-Mxm-Tag: swaks", "--auth-user",
            "demo@example.com", "--auth-password", "demo-password")
        self.assertEqual(code, 0, out)
        self.assertIn("<~  250-2.0.0 to=<a@example.org>", out)
        self.assertIn("<~  250-2.0.0 bcc=<b@example.org> (no tracking)", out)
        self.assertRegex(out, r"<~  250-2\.0\.0 from=<app@example\.com> ; flags=1 \(open\) ; "
                              r"tags=swaks")
        send_id = queued_id(out)
        assert relay.api is not None
        self.assertEqual((await fetch_json(f"{relay.api.url}/{send_id}"))["bcc"],
                         "b@example.org")

    async def test_curl_verbose(self) -> None:
        curl = need("curl")
        relay = ExplainRelay(self)
        port = relay.ports["submission"]
        msg = folder_for(self) / "m.eml"
        msg.write_bytes(message(to="a@example.org", sender="app@example.com"))
        out, code = await run(
            curl, "--silent", "--show-error", "--verbose", "--max-time", "20",
            f"smtp://localhost:{port}", "--resolve", f"localhost:{port}:127.0.0.1",
            "--ssl-reqd", "--cacert", str(relay.ca_file), "--mail-from", "app@example.com",
            "--mail-rcpt", "a@example.org", "--upload-file", str(msg),
            "-u", "demo@example.com:demo-password")
        self.assertEqual(code, 0, out)
        self.assertIn("< 250-2.0.0 to=<a@example.org>", out)
        self.assertIn("< 250 2.0.0 Ok: queued as ", out)
        queued_id(out)


# The library clients of tests/test_compat.py, run again here against a
# relay whose space explains (the default): each must still read the id
# from the multi-line reply.  Their checks are test_compat's own.
class Nodemailer(compat.Nodemailer):
    def setUp(self) -> None:
        super().setUp()
        self.relay = ExplainRelay(self)
        assert self.relay.api is not None
        self.api_url = self.relay.api.url


class PHPMailer(compat.PHPMailer):
    def setUp(self) -> None:
        super().setUp()
        self.relay = ExplainRelay(self)
        assert self.relay.api is not None
        self.api_url = self.relay.api.url


class Msmtp(compat.Msmtp):
    def setUp(self) -> None:
        super().setUp()
        self.relay = ExplainRelay(self)
        assert self.relay.api is not None
        self.api_url = self.relay.api.url

