"""Properties of the rules over generated header sections: any bytes,
folded at random, with the fields the rules own and the ones they do not."""

from __future__ import annotations

import datetime

from hypothesis import given
from hypothesis import strategies as st

from mxmrelay.reply import Reply
from mxmrelay.rules import Send
from mxmrelay.trace import received_header
from tests.rules_support import (
    FAST,
    RCPT,
    RECEIVED,
    TO,
    TOUCHED,
    Case,
    fields,
    name_of,
    rules,
    section,
)

# ----------------------------------------------------------------------------
# Properties

_names = st.from_regex(rb"[A-Za-z0-9-]{1,20}", fullmatch=True).filter(
    lambda n: n.lower() not in TOUCHED
)
# Values: any bytes except LF (so no CRLF appears by chance), folded at random.
_value_lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=3
)
_untouched = st.tuples(_names, _value_lines).map(
    lambda nv: nv[0] + b":" + b"\r\n ".join(nv[1]) + b"\r\n"
)
_header_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    b"From",
                    b"to",
                    b"CC",
                    b"Bcc",
                    b"X-Mxm-Flags",
                    b"X-Mxm-Tag",
                    b"Return-Path",
                    b"Message-ID",
                    b"Subject",
                    b"x",
                ]
            ),
            st.binary(max_size=60),
        ).map(lambda nv: nv[0] + b":" + nv[1] + b"\r\n"),
        max_size=8,
    ).map(b"".join),
    st.lists(
        st.sampled_from(
            [
                b"From:",
                b"To:",
                b" ",
                b"\t",
                b"\r\n",
                b"<",
                b">",
                b'"',
                b"\\",
                b"(",
                b")",
                b",",
                b";",
                b":",
                b"@",
                b"[",
                b"]",
                b"a",
                b"\xc3",
                b"=?utf-8?q?",
                b"?=",
                b"X-Mxm-Tag:",
                b"X-Mxm-Flags:",
            ]
        ),
        max_size=60,
    ).map(b"".join),
)


class PropertyTests(Case):
    @FAST
    @given(
        _header_bytes,
        st.lists(st.text(max_size=20), max_size=3),
        # MAIL FROM comes validated (mxmrelay.envelope): never a control character
        st.text(st.characters(blacklist_categories=["Cc"]), max_size=20),
    )
    def test_never_raises(self, headers: bytes, rcpt: list[str], mail_from: str) -> None:
        """Whatever the bytes: a Send or a Reply, and a Send keeps the invariants."""
        for data in [headers, headers + section(TO), section(TO) + headers]:
            for recipients in [tuple(rcpt), (RCPT, *rcpt)]:
                result = rules(data, rcpt=recipients, mail_from=mail_from)
                if isinstance(result, Reply):
                    self.assertTrue(result.text.isascii() and result.text.isprintable())
                    continue
                self.assertIsInstance(result, Send)
                self.assertTrue(result.headers.startswith(RECEIVED))
                names = [name_of(f) for f in fields(result.headers[len(RECEIVED) :])]
                self.assertEqual(names.count(b"from"), 1, result.headers)
                self.assertEqual(names.count(b"to"), 1, result.headers)
                self.assertFalse(TOUCHED.intersection(names) - {b"from", b"to"})
                self.assertTrue(result.to.isprintable(), result.to)
                self.assertIn(result.bcc, (None, *recipients))

    @FAST
    @given(st.text(max_size=300), st.text(max_size=50), st.text(max_size=50))
    def test_received_header_never_breaks(self, helo: str, address: str, rcpt: str) -> None:
        out = received_header(
            helo=helo,
            client_address=address,
            by_host=helo,
            protocol=address,
            send_id=rcpt,
            recipient=rcpt,
            when=datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
        )
        self.assertTrue(out.startswith(b"Received: from"))
        self.assertTrue(out.endswith(b"\r\n"))
        self.assertNotIn(b"\r", out.replace(b"\r\n", b""))
        self.assertNotIn(b"\n", out.replace(b"\r\n", b""))
        for line in out.split(b"\r\n")[1:-1]:
            self.assertIn(line[:1], (b"\t", b" "))

    @FAST
    @given(st.lists(_untouched, max_size=8), st.integers(0, 8), st.integers(0, 8))
    def test_untouched_fields_survive(self, others: list[bytes], i: int, j: int) -> None:
        from_in = b'From: "N" <x@y.example>\r\n'
        from_out = b'From: "N" <mailfrom@example.com>\r\n'
        to = TO + b"\r\n"
        before = list(others)
        before.insert(min(i, len(before)), from_in)
        before.insert(min(j, len(before)), to)
        send = self.send(b"".join(before))
        after = [from_out if f == from_in else f for f in before]
        self.assertEqual(send.headers, RECEIVED + b"".join(after))

    @FAST
    @given(
        st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}", fullmatch=True),
        st.from_regex(r"[a-z0-9]{1,10}\.[a-z]{2,6}", fullmatch=True),
        st.randoms(use_true_random=False),
    )
    def test_case_insensitive_match(self, local: str, domain: str, rnd: object) -> None:
        import random

        assert isinstance(rnd, random.Random)
        address = f"{local}@{domain}"
        shuffled = "".join(c.upper() if rnd.random() < 0.5 else c for c in address)
        send = self.send(
            section(b"To: <" + shuffled.encode() + b">"), rcpt=(address, "b@z.example")
        )
        self.assertEqual((send.to, send.bcc), (shuffled, "b@z.example"))

    @FAST
    @given(
        st.lists(
            st.lists(
                st.text(
                    st.characters(
                        blacklist_categories=["Cc", "Cs", "Zl", "Zp"], blacklist_characters=",="
                    ),
                    max_size=10,
                ),
                max_size=5,
            ),
            max_size=4,
        )
    )
    def test_tags_appended_in_order(self, headers: list[list[str]]) -> None:
        fields_ = ["X-Mxm-Tag: " + ",".join(tags) for tags in headers]
        send = self.send(section(TO, *fields_))
        expected: list[str] = []
        for tags in headers:
            for tag in tags:
                if tag.strip() and tag.strip() not in expected:
                    expected.append(tag.strip())
        self.assertEqual(send.tags, tuple(expected))
