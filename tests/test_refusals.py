"""Refused mail the customer can see, end to end: transactions refused
after AUTH reach the reference API as refusal records (POST /v1/refusals),
and its reports page shows them; refusals before AUTH do not."""

from __future__ import annotations

from twisted.trial import unittest

from tests.explain_support import ExplainRelay
from tests.helpers import need, run
from tests.support import fetch_bytes, in_thread, message


class Refusals(unittest.TestCase):
    timeout = 40

    async def test_refused_after_auth_are_reported(self) -> None:
        relay = ExplainRelay(self, max_recipients=2, max_message_size=4096)

        def talk() -> list[str]:
            c = relay.raw().ready()
            out = [c.cmd("MAIL FROM:<x@acme.test>")]  # 553: not the space's domain
            c.cmd("MAIL FROM:<app@example.com>")
            c.cmd("RCPT TO:<a@example.org>")
            c.cmd("RCPT TO:<b@example.org>")
            out.append(c.cmd("RCPT TO:<c@example.org>"))  # 452
            out.append(c.cmd("RCPT TO:<d@example.org>"))  # 452 again: one record
            c.cmd("DATA")
            # 550: the To is not among the RCPT TO addresses.
            out.append(c.cmd(message(subject="Wrong To", to="z@example.org") + b"."))
            c.cmd("MAIL FROM:<app@example.com>")
            c.cmd("RCPT TO:<a@example.org>")
            c.cmd("DATA")
            big = message(subject="Big", to="a@example.org", body=("x" * 50 + "\r\n") * 100)
            out.append(c.cmd(big + b"."))  # 552
            c.close()
            return out

        out = await in_thread(talk)
        self.assertEqual([o[:3] for o in out], ["553", "452", "452", "550", "552"])
        found = await relay.refusals_stored(4)
        self.assertEqual(sorted(r["reply"]["code"] for r in found), [452, 550, 552, 553])
        by_code = {r["reply"]["code"]: r for r in found}
        wrong_to = by_code[550]
        self.assertEqual((wrong_to["customer"], wrong_to["user"], wrong_to["mail_from"]),
                         ("demo", "demo@example.com", "app@example.com"))
        self.assertEqual(wrong_to["recipients"], ["a@example.org", "b@example.org"])
        self.assertEqual(wrong_to["subject"], "Wrong To")
        self.assertEqual(wrong_to["message_id"], "<Wrong.To@client.test>")
        self.assertEqual(wrong_to["client"]["listener"], "submission")
        self.assertIn("not one of the RCPT TO recipients", wrong_to["reply"]["text"])
        self.assertEqual(by_code[553]["recipients"], [])
        self.assertIsNone(by_code[553]["subject"])
        self.assertNotIn("x" * 50, str(found))  # nothing of the body
        page = (await fetch_bytes(f"{relay.api.base}/")).decode()  # type: ignore[union-attr]
        self.assertIn('id="refusals"', page)
        self.assertIn("553 5.7.1", page)
        mine = await relay.refusals_stored(4, "?user=demo@example.com&since=2000-01-01")
        self.assertEqual(len(mine), 4)
        self.assertEqual(await relay.refusals_stored(0, "?user=ops@acme.test"), [])

    async def test_swaks_refused_sender_is_reported(self) -> None:
        swaks = need("swaks")
        relay = ExplainRelay(self)
        out, code = await run(
            swaks, "--server", f"127.0.0.1:{relay.ports['submission']}", "--tls",
            "--timeout", "20", "--from", "x@acme.test", "--to", "a@example.org",
            "--auth-user", "demo@example.com", "--auth-password", "demo-password")
        self.assertNotEqual(code, 0, out)
        [found] = await relay.refusals_stored(1)
        self.assertEqual((found["reply"]["code"], found["mail_from"]), (553, "x@acme.test"))

    async def test_before_auth_not_reported(self) -> None:
        relay = ExplainRelay(self)

        def talk() -> str:
            c = relay.raw().ready(login=False)
            answer = c.login("demo@example.com", "wrong")
            c.cmd("MAIL FROM:<app@example.com>")
            c.close()
            return answer

        self.assertTrue((await in_thread(talk)).startswith("535"))
        # A refusal after AUTH on another connection flushes the queue:
        # only it arrives.
        def refused() -> None:
            c = relay.raw().ready()
            c.cmd("MAIL FROM:<x@acme.test>")
            c.close()

        await in_thread(refused)
        found = await relay.refusals_stored(1)
        self.assertEqual([r["reply"]["code"] for r in found], [553])
