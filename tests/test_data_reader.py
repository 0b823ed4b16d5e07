"""DATA framing (mxmrelay.datareader.DataReader), exhaustively: it is pure, so
every chunking of every stream can be checked against a line-by-line
reference without a socket."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mxmrelay.datareader import DataReader, _has_long_line
from mxmrelay.reply import Reply


class Collector:
    def __init__(self, max_size: int = 10**9) -> None:
        self.parts: list[bytes] = []
        self.discarded = False
        self.reader = DataReader(self.parts.append, self.discard, max_size)

    def discard(self) -> None:
        self.discarded = True

    def feed_all(self, chunks: list[bytes]) -> bytes | None:
        for i, chunk in enumerate(chunks):
            rest = self.reader.feed(chunk)
            if rest is not None:
                return rest + b"".join(chunks[i + 1:])
        return None

    @property
    def content(self) -> bytes:
        return b"".join(self.parts)


#: RFC 5321 4.5.3.1.6: characters in a text line, after dot-unstuffing.
LINE_LIMIT = 998
TOO_LONG = Reply(500, "5.5.2", "Line too long")


def reference(stream: bytes) -> tuple[bytes, bytes, Reply | None] | None:
    """Line-by-line RFC 5321 reading: the content, what follows the
    terminator, and the error if a line (once unstuffed) is over 998
    characters; bare CR/LF normalised to CRLF."""
    virtual = b"\r\n" + stream
    end = virtual.find(b"\r\n.\r\n")
    if end < 0:
        return None
    body = virtual[2:end + 2]
    body = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    lines = [line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n")[:-1]]
    out = b"".join(line + b"\r\n" for line in lines)
    error = TOO_LONG if any(len(line) > LINE_LIMIT for line in lines) else None
    return out, virtual[end + 5:], error


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


line = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
lines = st.lists(st.one_of(line, st.sampled_from([b".", b"..", b".x", b"", b" ."])), max_size=30)


class Framing(SynchronousTestCase):
    def test_examples(self) -> None:
        cases = [
            (b".\r\n", b"", b""),
            (b"a\r\n.\r\n", b"a\r\n", b""),
            (b"..\r\n.\r\n", b".\r\n", b""),
            (b".hidden\r\n.\r\nNOOP\r\n", b"hidden\r\n", b"NOOP\r\n"),
            (b"a\r\n..b\r\n.\r\nQUIT\r\n", b"a\r\n.b\r\n", b"QUIT\r\n"),
            # SMTP smuggling forms never end DATA; bare endings become CRLF.
            (b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n", b"a\r\n\r\nMAIL FROM:<x@y>\r\n", b""),
            (b"a\r.\rb\r\n.\r\n", b"a\r\n\r\nb\r\n", b""),
            (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n", b""),
            (b"a\n.\r\nb\r\n.\r\n", b"a\r\n\r\nb\r\n", b""),
            (b"a\r.\r\nb\r\n.\r\n", b"a\r\n\r\nb\r\n", b""),
        ]
        for stream, content, rest in cases:
            for size in (1, 2, 3, 5, len(stream)):
                c = Collector()
                got = c.feed_all([stream[i:i + size] for i in range(0, len(stream), size)])
                self.assertEqual((c.content, got), (content, rest), (stream, size))

    @settings(max_examples=300, deadline=None)
    @given(lines, st.lists(st.integers(0, 10_000), max_size=12), st.binary(max_size=20))
    def test_any_chunking_matches_line_reading(self, body_lines: list[bytes],
                                               cuts: list[int], after: bytes) -> None:
        stuffed = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n"
                           for x in body_lines)
        stream = stuffed + b".\r\n" + after
        c = Collector()
        rest = c.feed_all(chunked(stream, cuts))
        self.assertEqual(c.content, b"".join(x + b"\r\n" for x in body_lines))
        self.assertEqual(rest, after)
        self.assertIsNone(c.reader.error)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b".", b"\r\n", b"\r\n.\r\n", b"x" * 7,
                                     b"y" * 499, b"z" * 997]),
                    max_size=40),
           st.lists(st.integers(0, 10_000), max_size=12))
    def test_arbitrary_endings_agree_with_reference(self, atoms: list[bytes],
                                                    cuts: list[int]) -> None:
        stream = b"".join(atoms) + b"\r\n.\r\n"
        expected = reference(stream)
        assert expected is not None
        content, after, error = expected
        c = Collector()
        rest = c.feed_all(chunked(stream, cuts))
        self.assertEqual((rest, c.reader.error), (after, error))
        if error is None:
            self.assertEqual(c.content, content)

    def test_size_limit_reads_to_the_end(self) -> None:
        c = Collector(max_size=100)
        rest = c.feed_all([b"x" * 50 + b"\r\n"] * 10 + [b".\r\nNOOP\r\n"])
        self.assertEqual(rest, b"NOOP\r\n")
        self.assertEqual(c.reader.error, Reply(552, "5.3.4",
                                               "Message size exceeds fixed maximum message size"))
        self.assertTrue(c.discarded)
        self.assertLessEqual(len(c.content), 100)

    def test_long_line_reads_to_the_end(self) -> None:
        for chunks in ([b"a" * 1000 + b"\r\n.\r\n"], [b"a" * 500, b"a" * 500 + b"\r\n", b".\r\n"],
                       [b"ok\r\n" + b"a" * 5000, b"a" * 5000, b"\r\n.\r", b"\n"]):
            c = Collector()
            self.assertEqual(c.feed_all(chunks), b"")
            self.assertEqual(c.reader.error, Reply(500, "5.5.2", "Line too long"))

    def test_line_of_the_limit_is_accepted(self) -> None:
        c = Collector()
        c.feed_all([b"a" * 998 + b"\r\n." + b"b" * 998 + b"\r\n.\r\n"])
        self.assertIsNone(c.reader.error)
        self.assertEqual(c.content, b"a" * 998 + b"\r\n" + b"b" * 998 + b"\r\n")

    def test_endless_line_is_bounded(self) -> None:
        c = Collector()
        for _ in range(1000):
            self.assertIsNone(c.reader.feed(b"x" * 65536))
        self.assertLess(len(c.reader._carry), 10)
        self.assertEqual(c.reader.feed(b"\r\n.\r\n"), b"")

    def test_sink_refusal(self) -> None:
        def sink(data: bytes) -> None:
            raise Reply(552, "5.3.4", "Header section too large")

        reader = DataReader(sink, lambda: None, 10**6)
        self.assertEqual(reader.feed(b"a\r\nb\r\n.\r\n"), b"")
        self.assertEqual(reader.error, Reply(552, "5.3.4", "Header section too large"))


class LineLimit(SynchronousTestCase):
    """998 characters after unstuffing: exactly at the limit on both sides
    of it, with and without a stuffed dot, however the stream is cut."""

    def _read(self, chunks: list[bytes]) -> Collector:
        c = Collector()
        self.assertEqual(c.feed_all(chunks), b"NOOP\r\n")
        return c

    def test_boundary_any_cut(self) -> None:
        for length in (997, 998, 999, 1000):
            for stuffed in (False, True):
                text = (b"." if stuffed else b"") + b"a" * (length - stuffed)
                sent = (b"." if stuffed else b"") + text
                stream = b"ok\r\n" + sent + b"\r\nend\r\n.\r\nNOOP\r\n"
                for cut in range(len(stream)):
                    c = self._read([stream[:cut], stream[cut:]])
                    if length <= LINE_LIMIT:
                        self.assertIsNone(c.reader.error, (length, stuffed, cut))
                        self.assertEqual(c.content, b"ok\r\n" + text + b"\r\nend\r\n")
                    else:
                        self.assertEqual(c.reader.error, TOO_LONG, (length, stuffed, cut))
                for size in (1, 2, 3, 7, 64, 997, 998, 999, 1000, 1001, 4096):
                    c = self._read([stream[i:i + size] for i in range(0, len(stream), size)])
                    expected = None if length <= LINE_LIMIT else TOO_LONG
                    self.assertEqual(c.reader.error, expected, (length, stuffed, size))

    def test_examples(self) -> None:
        self.assertIsNone(self._read([b"a" * 998 + b"\r\n.\r\nNOOP\r\n"]).reader.error)
        self.assertIsNone(self._read([b"." + b"a" * 998 + b"\r\n.\r\nNOOP\r\n"]).reader.error)
        self.assertEqual(self._read([b"a" * 999 + b"\r\n.\r\nNOOP\r\n"]).reader.error,
                         TOO_LONG)
        self.assertEqual(self._read([b"." + b"a" * 999 + b"\r\n.\r\nNOOP\r\n"]).reader.error,
                         TOO_LONG)
        # bare CR endings are lines too: 2,000 characters of short lines pass
        self.assertIsNone(self._read([b"abc\r" * 500 + b"\r\n.\r\nNOOP\r\n"]).reader.error)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(990, 1002), st.booleans()), min_size=1, max_size=4),
           st.lists(st.integers(0, 5_000), max_size=8))
    def test_near_the_limit_agrees_with_reference(self, lines: list[tuple[int, bool]],
                                                  cuts: list[int]) -> None:
        stream = b"".join((b".." if dot else b"") + b"b" * (n - dot) + b"\r\n"
                          for n, dot in lines) + b".\r\nNOOP\r\n"
        expected = reference(stream)
        assert expected is not None
        c = Collector()
        rest = c.feed_all(chunked(stream, cuts))
        self.assertEqual((rest, c.reader.error), (expected[1], expected[2]))
        if expected[2] is None:
            self.assertEqual(c.content, expected[0])


class LongLines(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(0, 2500), max_size=20), st.integers(1, 1200))
    def test_matches_naive(self, lengths: list[int], limit: int) -> None:
        region = b"".join(b"\r\n" + b"x" * n for n in lengths)
        naive = any(n > limit for n in lengths)
        self.assertEqual(_has_long_line(region, limit), naive)


class ReadBoundaries(SynchronousTestCase):
    """The answer never depends on where the network splits the stream."""

    def test_longest_line_split_between_cr_and_lf(self) -> None:
        line = b"." + b"a" * 998 + b"\r\n"
        for cut in range(len(line) - 3, len(line) + 1):
            c = Collector()
            self.assertEqual(c.feed_all([line[:cut], line[cut:] + b".\r\n"]), b"")
            self.assertIsNone(c.reader.error, cut)
            self.assertEqual(c.content, b"a" * 998 + b"\r\n")

    def test_bare_lf_lines_split_anywhere(self) -> None:
        body = b"".join(b"line %04d of bare LF text\n" % i for i in range(200))
        stream = body + b"\r\n.\r\n"
        expected = body.replace(b"\n", b"\r\n") + b"\r\n"
        for size in (7, 100, 1000, 4096, len(stream)):
            c = Collector()
            c.feed_all([stream[i:i + size] for i in range(0, len(stream), size)])
            self.assertIsNone(c.reader.error, size)
            self.assertEqual(c.content, expected, size)

    def test_spool_failure_is_a_4xx(self) -> None:
        def sink(data: bytes) -> None:
            raise OSError(28, "No space left on device")

        reader = DataReader(sink, lambda: None, 10**6)
        self.assertEqual(reader.feed(b"a\r\n.\r\nNOOP\r\n"), b"NOOP\r\n")
        self.assertEqual(reader.error, Reply(452, "4.3.1", "Insufficient system storage"))
