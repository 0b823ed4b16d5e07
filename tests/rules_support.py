"""What the tests of mxmrelay.rules share: a customer space, an envelope,
the rules applied to a header section, and fields split independently of
the module.

The expected outputs are spelled out byte for byte: the point of the rules
module is that nothing it does not own changes, so the tests compare bytes,
not parsed headers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import HealthCheck, settings
from twisted.trial.unittest import SynchronousTestCase

from mxmrelay.directory import CustomerSpace
from mxmrelay.reply import Reply
from mxmrelay.rules import MAX_TAG_LENGTH, MAX_TAGS, Envelope, Send, apply_rules

CORPUS = Path(__file__).parent / "corpus"

SPACE = CustomerSpace(
    id="oxford",
    name="Oxford Stones",
    domains=frozenset({"example.com", "oxford-stones.example"}),
    default_flags=4,
    from_flags={"special@example.com": 9},
)
MAIL_FROM = "mailfrom@example.com"
RCPT = "rcpt@example.org"
TO = b"To: rcpt@example.org"
RECEIVED = (
    b"Received: from client.example ([192.0.2.1])\r\n"
    b"\tby relay.example.net with ESMTPSA id S1\r\n"
    b"\t; Tue, 02 Jan 2024 03:04:05 +0000\r\n"
)
TOUCHED = {b"from", b"to", b"cc", b"bcc", b"return-path", b"x-mxm-flags", b"x-mxm-tag"}

#: Modest by default to keep the file fast; MXMRELAY_RULES_EXAMPLES=5000 for a deep run.
FAST = settings(
    max_examples=int(os.environ.get("MXMRELAY_RULES_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def section(*lines: bytes | str) -> bytes:
    """A header section: each line (str as UTF-8) ended with CRLF."""
    return b"".join((s.encode() if isinstance(s, str) else s) + b"\r\n" for s in lines)


def rules(
    headers: bytes,
    *,
    mail_from: str = MAIL_FROM,
    rcpt: tuple[str, ...] = (RCPT,),
    max_tags: int = MAX_TAGS,
    max_tag_length: int = MAX_TAG_LENGTH,
) -> Send | Reply:
    return apply_rules(
        Envelope(mail_from, rcpt),
        headers,
        SPACE,
        send_id="S1",
        bounce_template="bounce+{id}@bounces.example.net",
        received=RECEIVED,
        max_tags=max_tags,
        max_tag_length=max_tag_length,
    )


def fields(headers: bytes) -> list[bytes]:
    """Fields (each with its CRLF), split independently of the module."""
    return [f for f in re.split(rb"(?<=\r\n)(?![ \t])", headers) if f]


def name_of(field: bytes) -> bytes:
    return field.split(b":", 1)[0].rstrip(b" \t").lower() if b":" in field else b""


class Case(SynchronousTestCase):
    def send(self, headers: bytes, **kw: object) -> Send:
        result = rules(headers, **kw)  # type: ignore[arg-type]
        if not isinstance(result, Send):
            self.fail(f"expected a Send for {headers!r}, got {result!r}")
        self.assertTrue(result.headers.startswith(RECEIVED))
        return result

    def violation(self, headers: bytes, **kw: object) -> Reply:
        result = rules(headers, **kw)  # type: ignore[arg-type]
        if not isinstance(result, Reply):
            self.fail(f"expected a Reply for {headers!r}, got {result!r}")
        self.assertEqual((result.code, result.enhanced), (550, "5.6.0"))
        self.assertTrue(result.text.isascii() and result.text.isprintable(), result.text)
        return result

    def named(self, send: Send, name: bytes) -> list[bytes]:
        """The output's fields called ``name``, without their CRLF."""
        return [f[:-2] for f in fields(send.headers) if name_of(f) == name]
