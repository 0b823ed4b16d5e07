"""``log_format``: JSON lines, and no secret in any line of either format.

The real ``twistd -n mxmrelay`` process logs a session with AUTH (the right
password, then wrong ones, PLAIN and LOGIN) and a send; its output is
parsed line by line (JSON) and scanned for the passwords, their base64
AUTH payloads and the message's text (both formats).
"""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
from typing import Any

from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from mxmrelay.logs import json_line
from tests.metrics_support import DEMO, WRONG, Relay, plain_payload
from tests.support import in_thread

BODY = "The quarterly secret figures."


def session(relay: Relay) -> list[str]:
    """AUTH PLAIN wrong, AUTH LOGIN wrong, AUTH PLAIN right, one send; the
    replies (blocking: call on a thread)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    client = smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=20,
                          local_hostname="client.test")
    replies = []
    try:
        client.starttls(context=ctx)
        client.ehlo()
        client.user = DEMO[0]
        for mechanism, password in (("PLAIN", WRONG), ("LOGIN", WRONG + "2"),
                                    ("PLAIN", DEMO[1])):
            client.password = password
            method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            try:
                replies.append(str(client.auth(mechanism, method)[0]))
            except smtplib.SMTPAuthenticationError as e:
                replies.append(str(e.smtp_code))
        message = (f"From: shop@example.com\r\nTo: someone@example.org\r\nSubject: figures\r\n"
                   f"Message-ID: <logs@client.test>\r\n\r\n{BODY}\r\n")
        client.sendmail("shop@example.com", ["someone@example.org"], message)
        replies.append("250")
        client.quit()
    finally:
        client.close()
    return replies


SECRETS = (DEMO[1], WRONG, plain_payload(*DEMO), plain_payload(DEMO[0], WRONG),
           base64.b64encode(DEMO[1].encode()).decode(),
           base64.b64encode(WRONG.encode()).decode(),
           base64.b64encode((WRONG + "2").encode()).decode(), BODY, "quarterly")


class Formats(unittest.TestCase):
    timeout = 60

    async def run_session(self, log_format: str, workers: int = 1) -> Relay:
        relay = Relay(self, log_format=log_format, workers=workers)
        await relay.start()
        self.assertEqual(await in_thread(session, relay), ["535", "535", "235", "250"])
        await relay.until(lambda: relay.out.text.count("auth failure") >= 2
                          and "sent id=" in relay.out.text, "the session's log lines")
        await relay.stop()
        for secret in SECRETS:
            self.assertNotIn(secret, relay.out.text, f"{secret!r} logged ({log_format})")
        return relay

    async def test_text_has_no_secret(self) -> None:
        relay = await self.run_session("text")
        self.assertIn("[mxmrelay.smtp#warn] auth failure rhost=127.0.0.1 user=demo@example.com",
                      relay.out.text)

    async def test_json_lines(self) -> None:
        relay = await self.run_session("json")
        events = [json.loads(line) for line in relay.out.text.splitlines() if line.strip()]
        for event in events:
            self.assertTrue({"time", "level", "namespace", "event"} <= set(event), event)
        failures = [e for e in events if e["event"].startswith("auth failure")]
        self.assertEqual(len(failures), 2)
        self.assertEqual(failures[0]["level"], "warn")
        self.assertEqual((failures[0]["client"], failures[0]["user"]),
                         ("127.0.0.1", DEMO[0]))
        [sent] = [e for e in events if e["event"].startswith("sent id=")]
        self.assertEqual(sent["namespace"], "mxmrelay.smtp")
        self.assertEqual((sent["user"], sent["rcpts"]), (DEMO[0], 1))
        self.assertIsInstance(sent["size"], int)
        self.assertTrue(sent["time"].endswith("Z"))
        [connect] = [e for e in events if e["event"].startswith("connect ")]
        self.assertEqual(connect["listener"], "submission")

    async def test_json_from_workers(self) -> None:
        relay = await self.run_session("json", workers=2)
        events = [json.loads(line) for line in relay.out.text.splitlines() if line.strip()]
        [sent] = [e for e in events if e["event"].startswith("sent id=")]
        self.assertIn(sent["worker"], (0, 1))
        self.assertTrue(any(e["event"].startswith("worker 1 started") for e in events))


class Line(unittest.TestCase):
    def event(self, **fields: Any) -> dict[str, Any]:
        return {"log_time": 0.25, "log_level": LogLevel.info, "log_namespace": "x.y",
                "log_format": "auth ok user={user}", **fields}

    def test_fields(self) -> None:
        line = json_line(self.event(user="a@b.c", size=12, when=object()), {"worker": 3})
        assert line is not None
        self.assertTrue(line.endswith("\n"))
        record = json.loads(line)
        self.assertEqual(record["time"], "1970-01-01T00:00:00.250Z")
        self.assertEqual((record["level"], record["namespace"]), ("info", "x.y"))
        self.assertEqual(record["event"], "auth ok user=a@b.c")
        self.assertEqual((record["user"], record["size"], record["worker"]), ("a@b.c", 12, 3))
        self.assertIsInstance(record["when"], str)

    def test_secret_fields_are_dropped(self) -> None:
        record = json.loads(json_line(self.event(user="u", password="hunter2",
                                                 credentials="x", Token="t")) or "")
        self.assertNotIn("hunter2", json.dumps(record))
        self.assertEqual(set(record) & {"password", "credentials", "Token"}, set())

    def test_failure_traceback(self) -> None:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            failure = Failure()
        record = json.loads(json_line(self.event(user="u", log_failure=failure)) or "")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(record["event"], formatEvent(self.event(user="u")))
