"""Pure tests: the decision lines (mxmrelay/explain.py), the multi-line
reply they go out in, and the refusal queue (mxmrelay/refusals.py) under a
Clock."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from mxmrelay import rules
from mxmrelay.connection import ConnectionInfo
from mxmrelay.explain import Queued, decision_lines
from mxmrelay.refusals import RefusalQueue, Rejected, record, refusals_url, reportable
from mxmrelay.reply import Reply
from tests.support import directory

LINE = re.compile(rb"250[- ][ -~]*\r\n")
SEND_ID = st.text("0123456789abcdefghjkmnpqrstvwxyz-_", min_size=1, max_size=64)
ANY_TEXT = st.text(max_size=600)


def send(**changes: Any) -> rules.Send:
    data: dict[str, Any] = {
        "headers": b"", "to": "someone@example.org", "bcc": None, "flags": 1,
        "bcc_flags": None, "tags": (), "return_path": "bounce+x@bounces.test",
        "message_id": None}
    data.update(changes)
    return rules.Send(**data)


class DecisionLines(unittest.SynchronousTestCase):
    def test_the_issue_example(self) -> None:
        s = send(bcc="audit@example.com", flags=3, bcc_flags=0, tags=("order", "confirmation"),
                 dropped_recipients=2, removed_fields=("Cc", "Bcc"), from_name='"Shop"')
        reply = Queued("01j", tuple(decision_lines(s, "app@example.com"))).encode()
        self.assertEqual(reply, (
            b"250-2.0.0 to=<someone@example.org>\r\n"
            b"250-2.0.0 bcc=<audit@example.com> (no tracking); dropped: 2 recipients, Cc, Bcc\r\n"
            b'250-2.0.0 from=<app@example.com> "Shop" ; flags=3 (open, click) ;'
            b" tags=order,confirmation\r\n"
            b"250 2.0.0 Ok: queued as 01j\r\n"))

    def test_sandbox_and_nothing_dropped(self) -> None:
        lines = decision_lines(send(flags=0), "app@example.com", sandbox=True)
        self.assertEqual(lines, ["sandbox: stored and shown, nothing delivered",
                                 "to=<someone@example.org>", "bcc=none",
                                 "from=<app@example.com> ; flags=0 (none) ; tags=none"])

    def test_without_lines_one_line(self) -> None:
        self.assertEqual(Queued("abc").encode(), b"250 2.0.0 Ok: queued as abc\r\n")

    def test_the_rules_say_what_they_dropped(self) -> None:
        space = directory().users["demo@example.com"].customer
        head = (b'From: "Shop" <x@y.test>\r\nTo: b@example.org\r\nCc: c@example.org\r\n'
                b"Bcc: d@example.org\r\nSubject: s\r\n")
        out = rules.apply_rules(
            rules.Envelope("app@example.com", ("a@example.org", "B@example.org",
                                               "c@example.org", "d@example.org")),
            head, space, send_id="x", bounce_template="b+{id}@b.test", received=b"Received: x")
        assert isinstance(out, rules.Send)
        self.assertEqual((out.to, out.bcc, out.dropped_recipients, out.removed_fields,
                          out.from_name), ("b@example.org", "a@example.org", 2, ("Cc", "Bcc"),
                                           '"Shop"'))

    @settings(max_examples=300, deadline=None)
    @given(to=ANY_TEXT, bcc=st.none() | ANY_TEXT, mail_from=ANY_TEXT,
           name=st.none() | ANY_TEXT, tags=st.lists(ANY_TEXT, max_size=120),
           flags=st.integers(0, 15), dropped=st.integers(0, 10**6),
           removed=st.sampled_from([(), ("Cc",), ("Bcc",), ("Cc", "Bcc")]),
           sandbox=st.booleans(), send_id=SEND_ID)
    def test_every_line_legal_last_line_exact(self, to: str, bcc: str | None, mail_from: str,
                                              name: str | None, tags: list[str], flags: int,
                                              dropped: int, removed: tuple[str, ...],
                                              sandbox: bool, send_id: str) -> None:
        s = send(to=to, bcc=bcc, flags=flags, tags=tuple(tags), dropped_recipients=dropped,
                 removed_fields=removed, from_name=name)
        wire = Queued(send_id, tuple(decision_lines(s, mail_from, sandbox=sandbox))).encode()
        lines = wire.split(b"\r\n")[:-1]
        for line in lines:
            self.assertLessEqual(len(line) + 2, 512)
            self.assertTrue(LINE.fullmatch(line + b"\r\n"), line)
        self.assertTrue(all(line.startswith(b"250-") for line in lines[:-1]))
        self.assertEqual(lines[-1], f"250 2.0.0 Ok: queued as {send_id}".encode())


def info() -> ConnectionInfo:
    c = ConnectionInfo("192.0.2.1", "submission")
    c.tls_version = "TLSv1.3"
    return c


class Records(unittest.SynchronousTestCase):
    def test_record_has_the_header_fields_and_nothing_of_the_body(self) -> None:
        r = record(when=0.0, space="demo", user="demo@example.com", sandbox=False,
                   connection=info(), mail_from="app@example.com", recipients=["a@b.test"],
                   reply=Reply(550, "5.6.0", "No To header"),
                   header_section=b"Subject: Hi\r\n there\r\nMessage-ID: <m@x>\r\n\r\n")
        self.assertEqual(r["time"], "1970-01-01T00:00:00.000Z")
        self.assertEqual((r["subject"], r["message_id"]), ("Hi there", "<m@x>"))
        self.assertEqual(r["reply"], {"code": 550, "enhanced": "5.6.0", "text": "No To header"})

    def test_what_is_reported(self) -> None:
        self.assertTrue(reportable(Reply(553, "5.7.1", "x"), data=False))
        self.assertTrue(reportable(Reply(451, "4.7.1", "limit"), data=False))
        self.assertTrue(reportable(Reply(452, "4.5.3", "Too many"), data=False))
        self.assertFalse(reportable(Reply(501, "5.1.3", "syntax"), data=False))
        self.assertTrue(reportable(Reply(500, "5.5.2", "Line too long"), data=True))
        self.assertFalse(reportable(Reply(451, "4.3.0", "API down"), data=True))

    def test_default_url(self) -> None:
        self.assertEqual(refusals_url("http://h:1/v1/sends"), "http://h:1/v1/refusals")
        self.assertIsNone(refusals_url("http://h:1/ingest"))


class Queue(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.posted: list[list[dict[str, Any]]] = []
        self.answers: list[Deferred[None]] = []

    def post(self, batch: list[dict[str, Any]]) -> Deferred[None]:
        self.posted.append(batch)
        return self.answers.pop(0) if self.answers else succeed(None)

    def queue(self, **kw: Any) -> RefusalQueue:
        return RefusalQueue(self.clock, self.post, **kw)

    def test_flushed_after_a_second(self) -> None:
        q = self.queue()
        q.add({"n": 1})
        q.add({"n": 2})
        self.assertEqual(self.posted, [])
        self.clock.advance(1.0)
        self.assertEqual(self.posted, [[{"n": 1}, {"n": 2}]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flushed_at_once_at_batch(self) -> None:
        q = self.queue(batch=3)
        for n in range(7):
            q.add({"n": n})
        self.assertEqual([len(b) for b in self.posted], [3, 3])
        self.clock.advance(1.0)
        self.assertEqual([len(b) for b in self.posted], [3, 3, 1])

    def test_slow_api_never_blocks_add(self) -> None:
        q = self.queue(batch=2, capacity=4)
        hanging: Deferred[None] = Deferred()
        self.answers.append(hanging)
        for n in range(10):
            q.add({"n": n})  # returns at once though the POST hangs
        self.assertEqual(len(self.posted), 1)
        self.assertEqual([r["n"] for r in q.waiting], [6, 7, 8, 9])
        self.assertEqual(q.dropped, 4)
        hanging.callback(None)
        self.assertEqual(q.dropped, 0)

    def test_failure_backs_off_and_keeps_order(self) -> None:
        q = self.queue(capacity=3)
        self.answers += [fail(RuntimeError("down")), fail(RuntimeError("down"))]
        q.add({"n": 1})
        self.clock.advance(1.0)
        self.assertEqual(len(self.posted), 1)
        q.add({"n": 2})
        self.clock.advance(1.9)  # backoff 2 s after one failure
        self.assertEqual(len(self.posted), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.posted), 2)
        q.add({"n": 3})
        q.add({"n": 4})  # full: the oldest goes
        self.assertEqual(q.dropped, 1)
        self.clock.advance(4.0)  # backoff 4 s after two
        self.assertEqual(self.posted[-1], [{"n": 2}, {"n": 3}, {"n": 4}])
        self.assertEqual((q.failures, q.dropped), (0, 0))

    def test_rejected_batch_is_dropped(self) -> None:
        q = self.queue()
        self.answers.append(fail(Rejected("400 bad")))
        q.add({"n": 1})
        self.clock.advance(1.0)
        self.assertEqual(list(q.waiting), [])
        self.assertEqual(q.failures, 0)
        self.flushLoggedErrors()

    def test_stop_cancels_the_timer(self) -> None:
        q = self.queue()
        q.add({"n": 1})
        q.stop()
        q.add({"n": 2})
        self.assertEqual(self.clock.getDelayedCalls(), [])
