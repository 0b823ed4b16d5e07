"""A sandbox credential end to end: TLS, AUTH, every rule and the id as
for a real user; the send reaches the reference API marked
``"sandbox": true`` with the header section as submitted, and its reports
page marks it and shows both header sections."""

from __future__ import annotations

from twisted.trial import unittest

from tests.explain_support import SANDBOX, ExplainRelay
from tests.helpers import queued_id
from tests.support import fetch_bytes, fetch_json, in_thread, message


class Sandbox(unittest.TestCase):
    timeout = 30

    async def send(self, relay: ExplainRelay, login: tuple[str, str]) -> str:
        def talk() -> str:
            c = relay.raw().ready(login=False)
            assert c.login(*login).startswith("235")
            for line in ("MAIL FROM:<app@example.com>", "RCPT TO:<a@example.org>",
                         "RCPT TO:<b@example.org>", "DATA"):
                c.cmd(line)
            answer = c.cmd(message(to="a@example.org", extra="Cc: c@example.org\r\n"
                                   "X-Mxm-Tag: trial\r\n") + b".")
            c.close()
            return answer

        return await in_thread(talk)

    async def test_sandbox_send_stored_marked_with_its_submitted_headers(self) -> None:
        relay = ExplainRelay(self)
        answer = await self.send(relay, SANDBOX)
        self.assertTrue(answer.startswith("250-2.0.0 sandbox: stored and shown, nothing "
                                          "delivered\n"), answer)
        send_id = queued_id(answer, alone=True)
        assert relay.api is not None
        stored = await fetch_json(f"{relay.api.url}/{send_id}")
        self.assertTrue(stored["sandbox"])
        self.assertEqual((stored["to"], stored["bcc"], stored["tags"]),
                         ("a@example.org", "b@example.org", ["trial"]))
        page = (await fetch_bytes(f"{relay.api.base}/sends/{send_id}")).decode()
        self.assertIn('id="sandbox"', page)
        submitted = page.split('id="submitted"')[1].split("</section>")[0]
        delivered = page.split('id="delivered"')[1].split("</section>")[0]
        self.assertIn("Cc: c@example.org", submitted)
        self.assertIn("X-Mxm-Tag: trial", submitted)
        self.assertNotIn("Cc: c@example.org", delivered)
        self.assertIn("Received: ", delivered)
        index = (await fetch_bytes(f"{relay.api.base}/")).decode()
        self.assertIn('class="send sandbox"', index)

    async def test_real_user_is_no_sandbox(self) -> None:
        relay = ExplainRelay(self)
        send_id = queued_id(await self.send(relay, ("demo@example.com", "demo-password")),
                            alone=True)
        assert relay.api is not None
        stored = await fetch_json(f"{relay.api.url}/{send_id}")
        self.assertFalse(stored["sandbox"])
        page = (await fetch_bytes(f"{relay.api.base}/sends/{send_id}")).decode()
        self.assertNotIn('id="sandbox"', page)

    async def test_same_message_sandbox_then_real_is_two_sends(self) -> None:
        """A sandbox send never stands in for a real one (idempotency)."""
        relay = ExplainRelay(self)
        first = queued_id(await self.send(relay, SANDBOX), alone=True)
        second = queued_id(await self.send(relay, ("demo@example.com", "demo-password")),
                           alone=True)
        self.assertNotEqual(first, second)
