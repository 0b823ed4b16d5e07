"""The address reader's fast path agrees with the full reader.

:mod:`mxmrelay.fastpath` answers for the common shapes of From and To
without lexing; for every field value it accepts, each of its functions
must return exactly what :mod:`mxmrelay.addresses` returns, spans and all.
Values are generated both from the shapes themselves (so that nearly all
are accepted) and from their pieces put together at random (so that the
edges of the shapes are crossed both ways).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mxmrelay import addresses, fastpath

_atext = st.sampled_from([b"a", b"Z", b"0", b"-", b"+", b"!", b"#", b"=", b"?", b"_", b"'",
                          b"\xc3\xa9", b"\x7f", b"\x01", b"~", b"/"])
_atom = st.lists(_atext, min_size=1, max_size=4).map(b"".join)
_dot_atom = st.lists(_atom, min_size=1, max_size=3).map(b".".join)
_addr = st.tuples(_dot_atom, _dot_atom).map(b"@".join)
_quoted = st.lists(st.sampled_from([b"a", b" ", b",", b"<", b"@", b".", b"(", b"\xe2\x82\xac",
                                    b":", b";"]), max_size=5).map(lambda p: b'"' + b"".join(p)
                                                                  + b'"')
_wsp = st.sampled_from([b"", b" ", b"\t", b"  "])
_word = st.one_of(_atom, _quoted)
_gap = st.sampled_from([b" ", b"\t", b"  "])
_phrase = st.tuples(_word, st.lists(st.tuples(_gap, _word), max_size=3)).map(
    lambda fr: fr[0] + b"".join(g + w for g, w in fr[1]))


@st.composite
def _shaped(draw: st.DrawFn) -> bytes:
    """A value of one of the fast shapes, with white space around."""
    addr = draw(_addr)
    kind = draw(st.sampled_from(["bare", "angle", "named"]))
    if kind == "bare":
        core = addr
    elif kind == "angle":
        core = b"<" + addr + b">"
    else:
        core = draw(_phrase) + draw(_wsp) + b"<" + addr + b">"
    return draw(_wsp) + core + draw(_wsp)


#: Pieces of the shapes and of what is beyond them, put together at random.
_piece = st.one_of(_atom, _quoted, _wsp, st.sampled_from(
    [b"<", b">", b"@", b".", b",", b":", b";", b"(c)", b"\\", b'"', b"[1.2.3.4]", b"\r\n ",
     b"\r", b"\n", b"a@b", b"<a@b>"]))
_mixed = st.lists(_piece, max_size=12).map(b"".join)
_value = st.one_of(_shaped(), _mixed)
_prefix = st.sampled_from([b"", b"To:", b"From: x\r\nTo:"])


class FastPathAgrees(unittest.TestCase):
    def check(self, prefix: bytes, value: bytes) -> bool:
        buf = prefix + value + b"\r\n"
        start, end = len(prefix), len(prefix) + len(value)
        accepted = fastpath._shape(buf, start, end) is not None
        full = addresses.mailboxes(buf, start, end)
        self.assertEqual(fastpath.mailboxes(buf, start, end), full)
        self.assertEqual(fastpath.lone_mailbox(buf, start, end),
                         addresses.lone_mailbox(buf, start, end))
        for box in full.boxes:
            self.assertEqual(fastpath.display_name(buf, box), addresses.display_name(buf, box))
        return accepted

    @settings(max_examples=1500)
    @given(_prefix, _shaped())
    def test_the_shapes(self, prefix: bytes, value: bytes) -> None:
        self.assertTrue(self.check(prefix, value), value)

    @settings(max_examples=1500)
    @given(_prefix, _mixed)
    def test_their_pieces_at_random(self, prefix: bytes, value: bytes) -> None:
        self.check(prefix, value)

    @given(st.binary(max_size=60))
    def test_any_bytes(self, value: bytes) -> None:
        self.check(b"To:", value)

    def test_typical_values_are_fast(self) -> None:
        """The shapes the fast path is for: taken by it, not by the full reader."""
        for value in (b" someone@example.org", b" <someone@example.org>",
                      b" Someone <someone@example.org>", b' "Shop, Inc." <shop@example.com>',
                      b" =?utf-8?q?Caf=C3=A9?= <cafe@example.com>", b"\tJohn Smith<j@x.y>"):
            self.assertTrue(self.check(b"To:", value), value)
        for value in (b" a@b (Oxford Stones)", b" a@b, c@d", b" G: a@b;", b' "a\\"b" <a@b>',
                      b" J. Smith <j@x>", b" Someone\r\n <a@b>", b" <@route:a@b>",
                      b" a@[127.0.0.1]", b" a..b@c", b" Smith. <a@b>"):
            self.assertFalse(self.check(b"To:", value), value)
