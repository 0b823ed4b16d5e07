"""Request bodies of every size, and a body producer that honours pause,
resume and stop wherever they find it.

A TCP transport pauses its producer from inside ``write`` as soon as its
buffer holds more than ``FileDescriptor.bufferSize`` bytes, so a header
section of a few tens of KB pauses the request body before the spooled
file has begun to stream.  First the producer alone, against consumers
that pause or stop it at each of its writes, on turns of a reactor the
test takes one at a time; then the real relay forwarding to the real
reference API over loopback HTTP, with header sections and bodies on
either side of every size boundary on the way, and once more through an
API that reads slowly, so that the transport really pauses mid-file.
"""

from __future__ import annotations

import io
import re
import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IProducer
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock, Cooperator
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mxmrelay import forwarder
from mxmrelay.forwarder import SMALL_BODY, MultipartProducer, PartsProducer
from mxmrelay.spool import MAX_HEADER_SECTION
from tests.forwarding_support import (
    TIMED_OUT,
    Ledger,
    Server,
    reference_api,
    relay_to,
    session,
    transact,
)
from tests.helpers import QUEUED, queued_id
from tests.support import RelayUnderTest, fetch_bytes, in_thread

#: Where a TCP transport pauses its producer.
TRANSPORT_BUFFER = FileDescriptor.bufferSize

# --------------------------------------------------------------------------
# The producer alone


class Turns:
    """A reactor's turns, taken by the test one at a time: a cooperator
    that does one unit of work a turn, scheduled on a :class:`Clock`."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.cooperator = Cooperator(terminationPredicateFactory=lambda: lambda: True,
                                     scheduler=self._schedule)

    def _schedule(self, call: Callable[[], None]) -> IDelayedCall:
        return self.clock.callLater(1, call)

    def pending(self) -> bool:
        return bool(self.clock.getDelayedCalls())

    def take(self, turns: int = 1) -> None:
        for _ in range(turns):
            self.clock.advance(1)

    def settle(self, limit: int = 1000) -> int:
        """Take turns until none is due; how many were taken."""
        taken = 0
        while self.pending():
            assert taken < limit, "the producer never settles"
            self.take()
            taken += 1
        return taken


@implementer(IConsumer)
class Sink:
    """Records what is written; ``hook`` runs inside each write (with the
    write's index), the way a transport pauses its producer there."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.hook: Callable[[int], None] | None = None
        self.depth = 0
        self.deepest = 0

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def write(self, data: bytes) -> None:
        self.depth += 1
        self.deepest = max(self.deepest, self.depth)
        try:
            self.writes.append(data)
            if self.hook is not None:
                self.hook(len(self.writes) - 1)
        finally:
            self.depth -= 1

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        raise AssertionError("a body producer is registered by its request, not by itself")

    def unregisterProducer(self) -> None:
        raise AssertionError("a body producer must not unregister itself")


class Transport(Sink):
    """A consumer that buffers and pauses its producer from inside
    ``write`` once it holds more than ``limit`` bytes, and resumes it when
    it has written its buffer out, as ``FileDescriptor`` does."""

    def __init__(self, producer: PartsProducer, limit: int = TRANSPORT_BUFFER) -> None:
        super().__init__()
        self.producer = producer
        self.limit = limit
        self.buffered = 0
        self.paused = False
        self.pauses: list[int] = []

    def write(self, data: bytes) -> None:
        assert not self.paused, "written to while paused"
        super().write(data)
        self.buffered += len(data)
        if self.buffered > self.limit:
            self.paused = True
            self.pauses.append(len(self.data))
            self.producer.pauseProducing()

    def flush(self) -> None:
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.producer.resumeProducing()


def body(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that show where any of them went missing."""
    out = bytearray()
    line = seed
    while len(out) < size:
        out += b"%08d " % line + bytes(range(33, 127)) + b"\r\n"
        line += 1
    return bytes(out[:size])


class FailingFile(io.BytesIO):
    """Reads fail after the first."""

    reads = 0

    def read(self, size: int | None = -1, /) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise OSError("spool unreadable")
        return super().read(size)


@attrs.define
class Case:
    """A producer on turns the test takes, what it must write, and where."""

    expected: bytes
    turns: Turns
    producer: PartsProducer
    sink: Sink


def make(head: int = 1000, file: int = 3 * SMALL_BODY + 5) -> Case:
    """``pre``, a header section, the spooled file and ``post``."""
    pre, h, f, post = b"--pre--\r\n", body(head, 1), body(file, 2), b"\r\n--post--\r\n"
    turns = Turns()
    producer = PartsProducer([pre, h, io.BytesIO(f), post],
                             cooperate=turns.cooperator.cooperate)
    return Case(pre + h + f + post, turns, producer, Sink())


def writes_of(head: int = 1000, file: int = 3 * SMALL_BODY + 5) -> int:
    """How many writes the producer makes with nothing in its way."""
    case = make(head, file)
    case.producer.startProducing(case.sink)
    case.turns.settle()
    return len(case.sink.writes)


class Producer(unittest.SynchronousTestCase):
    def test_interface_and_length(self) -> None:
        case = make()
        verifyObject(IBodyProducer, case.producer)
        self.assertEqual(case.producer.length, len(case.expected))

    def test_length_counts_a_file_from_where_it_stands(self) -> None:
        f = io.BytesIO(b"skipped|kept")
        f.seek(8)
        p = PartsProducer([b"a", f])
        self.assertEqual(p.length, 5)
        sink = Sink()
        self.assertIsNone(self.successResultOf(p.startProducing(sink)))
        self.assertEqual(sink.data, b"akept")

    def test_small_body_in_one_write_without_a_turn(self) -> None:
        """Up to SMALL_BODY the file is one write, all of it in
        ``startProducing``: no turn of the reactor to wait for."""
        for size in (0, 1, SMALL_BODY - 1, SMALL_BODY):
            case = make(file=size)
            d = case.producer.startProducing(case.sink)
            self.assertIsNone(self.successResultOf(d))
            self.assertFalse(case.turns.pending())
            self.assertEqual(case.sink.data, case.expected)
            self.assertEqual([len(w) for w in case.sink.writes],
                             [9, 1000] + ([size] if size else []) + [12])

    def test_large_body_one_chunk_a_turn(self) -> None:
        case = make(file=3 * SMALL_BODY + 5)
        d = case.producer.startProducing(case.sink)
        self.assertEqual([len(w) for w in case.sink.writes], [9, 1000, SMALL_BODY])
        self.assertNoResult(d)
        case.turns.take()
        self.assertEqual(len(case.sink.writes), 4)
        self.assertEqual(case.turns.settle(), 2)
        self.assertEqual([len(w) for w in case.sink.writes[3:]], [SMALL_BODY, SMALL_BODY, 5, 12])
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(case.sink.data, case.expected)

    def test_pause_before_start(self) -> None:
        case = make()
        case.producer.pauseProducing()
        d = case.producer.startProducing(case.sink)
        case.turns.settle()
        self.assertEqual(case.sink.writes, [])
        case.producer.resumeProducing()
        self.assertEqual(case.sink.writes, [], "written from inside resumeProducing")
        case.turns.settle()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(case.sink.data, case.expected)

    def test_resume_before_start(self) -> None:
        case = make()
        case.producer.resumeProducing()
        self.assertFalse(case.turns.pending())
        d = case.producer.startProducing(case.sink)
        case.turns.settle()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(case.sink.data, case.expected)

    def test_pause_inside_each_write(self) -> None:
        """Inside the header section's write (the file not begun: the bug),
        inside each chunk of the file, and inside the very last write."""
        for head, file in ((1000, 3 * SMALL_BODY + 5), (200_000, 10), (200_000, 0)):
            count = writes_of(head, file)
            for i in range(count):
                case = make(head, file)
                case.sink.hook = lambda n, i=i, p=case.producer: n == i and p.pauseProducing()
                d = case.producer.startProducing(case.sink)
                case.turns.take(5)
                case.turns.settle()
                self.assertEqual(len(case.sink.writes), i + 1, (head, file, i))
                if i == count - 1:
                    self.assertIsNone(self.successResultOf(d))
                else:
                    self.assertNoResult(d)
                case.producer.resumeProducing()
                self.assertEqual(len(case.sink.writes), i + 1, "written inside resumeProducing")
                case.turns.settle()
                self.assertEqual(case.sink.data, case.expected, (head, file, i))
                self.assertIsNone(self.successResultOf(d))

    def test_pause_between_turns(self) -> None:
        case = make()
        d = case.producer.startProducing(case.sink)
        case.turns.take()
        written = len(case.sink.writes)
        case.producer.pauseProducing()
        case.turns.take(5)
        self.assertEqual(len(case.sink.writes), written)
        self.assertFalse(case.turns.pending(), "a paused producer takes no turns")
        case.producer.resumeProducing()
        case.turns.settle()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(case.sink.data, case.expected)

    def test_pause_and_resume_inside_one_write(self) -> None:
        """Nothing lost, nothing twice, and no write inside a write."""
        for i in range(writes_of()):
            case = make()

            def both(n: int, i: int = i, p: PartsProducer = case.producer) -> None:
                if n == i:
                    p.pauseProducing()
                    p.resumeProducing()

            case.sink.hook = both
            d = case.producer.startProducing(case.sink)
            case.turns.settle()
            self.assertIsNone(self.successResultOf(d))
            self.assertEqual(case.sink.data, case.expected)
            self.assertEqual(case.sink.deepest, 1)

    def test_pauses_do_not_count(self) -> None:
        """Two pauses need one resume; a resume without a pause is harmless."""
        case = make()
        case.producer.resumeProducing()
        d = case.producer.startProducing(case.sink)
        case.producer.pauseProducing()
        case.producer.pauseProducing()
        case.turns.settle()
        case.producer.resumeProducing()
        case.producer.resumeProducing()
        case.turns.settle()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(case.sink.data, case.expected)

    def test_after_the_end(self) -> None:
        case = make()
        d = case.producer.startProducing(case.sink)
        case.turns.settle()
        self.assertIsNone(self.successResultOf(d))
        for call in (case.producer.pauseProducing, case.producer.resumeProducing,
                     case.producer.stopProducing, case.producer.resumeProducing):
            call()
        self.assertFalse(case.turns.pending())
        self.assertEqual(case.sink.data, case.expected)

    def test_stop_inside_each_write(self) -> None:
        """No write after, and the Deferred never fires (IBodyProducer)."""
        for head, file in ((1000, 3 * SMALL_BODY + 5), (200_000, 10)):
            count = writes_of(head, file)
            for i in range(count):
                case = make(head, file)
                case.sink.hook = lambda n, i=i, p=case.producer: n == i and p.stopProducing()
                d = case.producer.startProducing(case.sink)
                case.turns.settle()
                case.producer.resumeProducing()
                case.turns.settle()
                self.assertEqual(len(case.sink.writes), i + 1)
                self.assertTrue(case.expected.startswith(case.sink.data))
                self.assertNoResult(d)

    def test_stop_before_start(self) -> None:
        case = make()
        case.producer.stopProducing()
        d = case.producer.startProducing(case.sink)
        case.producer.resumeProducing()
        case.turns.settle()
        self.assertEqual(case.sink.writes, [])
        self.assertNoResult(d)

    def test_stop_between_turns_and_while_paused(self) -> None:
        for paused in (False, True):
            case = make()
            d = case.producer.startProducing(case.sink)
            if paused:
                case.producer.pauseProducing()
            case.producer.stopProducing()
            case.producer.resumeProducing()
            case.turns.settle()
            self.assertEqual(len(case.sink.writes), 3)
            self.assertNoResult(d)

    def test_cancel(self) -> None:
        case = make()
        d = case.producer.startProducing(case.sink)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        case.turns.settle()
        self.assertEqual(len(case.sink.writes), 3)

    def test_read_fails(self) -> None:
        turns = Turns()
        p = PartsProducer([b"pre", FailingFile(b"x" * (SMALL_BODY + 1)), b"post"],
                          cooperate=turns.cooperator.cooperate)
        sink = Sink()
        d = p.startProducing(sink)
        turns.settle()
        self.failureResultOf(d, OSError)
        self.assertEqual([len(w) for w in sink.writes], [3, SMALL_BODY])

    def test_file_shorter_than_its_length(self) -> None:
        turns = Turns()
        f = io.BytesIO(b"x" * (SMALL_BODY + 10))
        p = PartsProducer([f, b"post"], cooperate=turns.cooperator.cooperate)
        f.truncate(SMALL_BODY + 5)
        sink = Sink()
        d = p.startProducing(sink)
        turns.settle()
        self.failureResultOf(d, EOFError)
        self.assertEqual(len(sink.data), SMALL_BODY + 5)

    def test_write_fails(self) -> None:
        case = make()

        def refuse(n: int) -> None:
            if n == 3:
                raise ValueError("too many bytes")

        case.sink.hook = refuse
        d = case.producer.startProducing(case.sink)
        case.turns.settle()
        self.failureResultOf(d, ValueError)
        self.assertEqual(len(case.sink.writes), 4)

    def test_behind_a_transport(self) -> None:
        """Against a transport-like consumer, with the first write on
        either side of the transport's buffer, and files on either side
        of SMALL_BODY: every byte, in order, never written while paused."""
        pre, post = b"--pre--\r\n", b"\r\n--post--\r\n"
        first = TRANSPORT_BUFFER - len(pre)
        for head in (10, first - 1, first, first + 1, MAX_HEADER_SECTION):
            for file in (0, 2, SMALL_BODY - 1, SMALL_BODY, SMALL_BODY + 1, 5 * SMALL_BODY + 3):
                turns = Turns()
                h, f = body(head, 1), body(file, 2)
                p = PartsProducer([pre, h, io.BytesIO(f), post],
                                  cooperate=turns.cooperator.cooperate)
                transport = Transport(p)
                d = p.startProducing(transport)
                for _ in range(100):
                    if not turns.pending() and not transport.paused:
                        break
                    turns.take()
                    transport.flush()
                self.assertIsNone(self.successResultOf(d), (head, file))
                self.assertTrue(transport.data == pre + h + f + post, (head, file))
                if head + len(pre) > TRANSPORT_BUFFER:
                    self.assertEqual(transport.pauses[0], len(pre) + head)

    def test_multipart_framing(self) -> None:
        turns = Turns()
        head, file = body(70_000, 1), body(SMALL_BODY + 1, 2)
        p = MultipartProducer(b'{"id": "x"}', head, io.BytesIO(file),
                              cooperate=turns.cooperator.cooperate)
        sink = Sink()
        d = p.startProducing(sink)
        turns.settle()
        self.assertIsNone(self.successResultOf(d))
        b = p.boundary.encode()
        self.assertEqual(p.content_type, b"multipart/form-data; boundary=" + b)
        self.assertEqual(sink.data, (
            b"--" + b + b'\r\nContent-Disposition: form-data; name="metadata"\r\n'
            b'Content-Type: application/json\r\n\r\n{"id": "x"}\r\n--' + b +
            b'\r\nContent-Disposition: form-data; name="message"\r\n'
            b"Content-Type: message/rfc822\r\n\r\n" + head + file + b"\r\n--" + b + b"--\r\n"))
        self.assertEqual(p.length, len(sink.data))


class OnTheReactor(unittest.TestCase):
    """The request body as the forwarder makes it, on the real reactor's
    cooperator, paused inside its first write as a transport pauses it."""

    async def test_paused_inside_the_header_section(self) -> None:
        head, file = body(200_000, 1), body(3 * SMALL_BODY, 2)
        p = MultipartProducer(b"{}", head, io.BytesIO(file))
        sink = Sink()
        resumed: list[IDelayedCall] = []

        def pause_then_resume(n: int) -> None:
            if n == 0:
                p.pauseProducing()
                resumed.append(reactor.callLater(0, p.resumeProducing))

        sink.hook = pause_then_resume
        await p.startProducing(sink)
        self.assertTrue(resumed)
        self.assertEqual(len(sink.data), p.length)
        self.assertTrue(sink.data.endswith(head + file + b"\r\n--" + p.boundary.encode()
                                           + b"--\r\n"))


# --------------------------------------------------------------------------
# End to end


#: The trace field the relay adds on top, folded lines and all.
RECEIVED = re.compile(rb"\AReceived: from client\.test [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
FROM = b'From: "Shop" <shop@example.com>\r\n'
FROM_REWRITTEN = b'From: "Shop" <app@example.com>\r\n'


def header_section(size: int, n: int) -> bytes:
    """A header section of exactly ``size`` bytes (its last CRLF
    included), From first: long trace and reference chains, folded
    signatures and a field of a thousand folded lines, as a hostile or
    merely old thread writes them."""
    out = bytearray(FROM + b"To: someone@example.org\r\nSubject: size %d\r\n"
                    b"Message-ID: <size.%d.%d@client.test>\r\n" % (size, size, n))
    i = 0
    while size - len(out) > 2000:
        kind = i % 4
        if kind == 0:
            field = (b"Received: from mx%d.example.net (mx%d.example.net [192.0.2.%d])\r\n"
                     b"\tby relay.example.org with ESMTPS id %08x\r\n"
                     b"\tfor <someone@example.org>; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                     % (i, i, i % 250, i))
        elif kind == 1:
            field = b"References:" + b"".join(b"\r\n <thread.%d.%d@example.net>" % (i, j)
                                                 for j in range(20)) + b"\r\n"
        elif kind == 2:
            field = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=s%d;\r\n\tb=" % i
                     + b"\r\n\t".join([b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                       b"0123456789+/"] * 6) + b"\r\n")
        else:
            field = b"X-Thousand-Lines: start" + b"\r\n\tl" * min(1000, (size - len(out)) // 4
                                                                   - 500) + b"\r\n"
        out += field
        i += 1
    while len(out) < size:
        room = size - len(out)
        take = room if room <= 900 else (900 if room - 900 >= 20 else 800)
        out += b"X-Pad: " + b"p" * (take - 9) + b"\r\n"
    assert len(out) == size, (len(out), size)
    return bytes(out)


def message_body(size: int, seed: int) -> bytes:
    """A body of ``size`` bytes as the spool holds it (its blank line
    first), with lines that start with a dot; ``size`` 0: no body at all."""
    if size == 0:
        return b""
    assert size == 2 or size >= 4
    text = bytearray()
    line = 0
    while len(text) < size - 2:
        text += b".%07d %d " % (line, seed) + b"0123456789abcdef" * 4 + b"\r\n"
        line += 1
    del text[size - 4:]
    if text.endswith(b"\r"):  # a bare CR would arrive as CRLF
        text[-1:] = b"x"
    return b"\r\n" + bytes(text) + (b"\r\n" if size >= 4 else b"")


def assert_stored(testcase: unittest.TestCase, stored: bytes, sent: bytes,
                  what: object) -> None:
    """``stored`` is ``sent`` as the rules rewrite it: a trace field on
    top, the From field's address replaced, every other byte as sent."""
    trace = RECEIVED.match(stored)
    testcase.assertIsNotNone(trace, (what, stored[:300]))
    assert trace is not None and sent.startswith(FROM)
    rest, expected = stored[trace.end():], FROM_REWRITTEN + sent[len(FROM):]
    # No assertEqual diff of a megabyte when they differ.
    testcase.assertTrue(rest == expected, f"{what}: {len(rest)} bytes stored after the "
                        f"trace field, {len(expected)} expected")


class Sizes(unittest.TestCase):
    """Header sections and bodies across every size boundary between the
    client and the API, each stored byte for byte."""

    def sizes(self, spool_memory: int) -> list[tuple[int, int]]:
        first = TRANSPORT_BUFFER  # the transport pauses past this
        small = 300
        return [
            (small, 0), (small, 2), (small, 4),
            (small, SMALL_BODY - 1), (small, SMALL_BODY), (small, SMALL_BODY + 1),
            (first - 1000, SMALL_BODY), (first - 1, 100), (first, 100), (first + 1, 100),
            (first + 1, SMALL_BODY + 1), (2 * first + 1, 0),
            (small, spool_memory), (small, spool_memory + 1),
            (spool_memory + 1, spool_memory + 1),
            (small, 3 * SMALL_BODY + 7),
            (MAX_HEADER_SECTION, 0), (MAX_HEADER_SECTION, 100),
            (MAX_HEADER_SECTION, 2 * SMALL_BODY + 1),
        ]

    async def test_every_size_stored_exactly(self) -> None:
        _, api = reference_api(self)
        relay = RelayUnderTest(self, api_url=api.url)
        ledger = Ledger(self, api)
        cases = [(head, size, header_section(head, n) + message_body(size, n))
                 for n, (head, size) in enumerate(self.sizes(relay.config.spool_memory))]
        too_big = header_section(MAX_HEADER_SECTION + 1, 99) + message_body(100, 99)

        def talk() -> tuple[list[str], str, str]:
            c = session(relay)
            try:
                replies = [transact(c, sent) for _, _, sent in cases]
                return replies, transact(c, too_big), transact(c, cases[1][2])
            finally:
                c.close()

        replies, refused, after = await in_thread(talk)
        self.assertEqual(refused, f"552 5.3.4 Header section exceeds {MAX_HEADER_SECTION} bytes")
        self.assertTrue(after.startswith(QUEUED), after)
        ledger.reply(after)
        for (head, size, sent), reply in zip(cases, replies, strict=True):
            self.assertTrue(reply.startswith(QUEUED), (head, size, reply))
            send_id = queued_id(ledger.reply(reply), alone=True)
            stored = await fetch_bytes(f"{api.url}/{send_id}/message")
            assert_stored(self, stored, sent, (head, size))
        await ledger.check()


class Sipping(ProtocolWrapper):
    """Reads a request a sip at a time: after each read the connection
    stops reading until a later turn of the reactor, so the relay's socket
    fills and its transport pauses the body producer again and again."""

    factory: SlowAPI

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.factory.reads += 1
        transport: Any = self.transport
        if transport is not None:
            transport.pauseProducing()
            self.factory.later(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.forget(self)
        super().connectionLost(reason)


class SlowAPI(Server):
    """The reference API behind a socket with a small receive buffer that
    is read slowly."""

    protocol = Sipping

    def __init__(self, testcase: unittest.TestCase, factory: Any, delay: float = 0.002,
                 buffer: int = 8192) -> None:
        super().__init__(testcase, factory)
        # Accepted connections inherit the listening socket's buffer.
        listening: Any = self.port
        listening.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        self.delay = delay
        self.reads = 0
        self._calls: dict[Sipping, IDelayedCall] = {}

    def later(self, p: Sipping) -> None:
        self._calls[p] = reactor.callLater(self.delay, self._resume, p, p.transport)

    def _resume(self, p: Sipping, transport: Any) -> None:
        del self._calls[p]
        transport.resumeProducing()

    def forget(self, p: Sipping) -> None:
        call = self._calls.pop(p, None)
        if call is not None:
            call.cancel()


@implementer(IConsumer)
@attrs.define
class Counting:
    """Counts what the request body producer writes."""

    consumer: Any
    written: int = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.consumer.write(data)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.consumer.unregisterProducer()


def watch(testcase: unittest.TestCase) -> dict[str, list[tuple[int, int]]]:
    """Have the forwarder's request bodies note, for each pause and each
    stop, how far they had got: (bytes written, length)."""
    seen: dict[str, list[tuple[int, int]]] = {"pause": [], "stop": []}

    class Watched(MultipartProducer):
        counting: Counting | None = None

        def startProducing(self, consumer: IConsumer) -> Deferred[None]:
            self.counting = Counting(consumer)
            return super().startProducing(self.counting)

        def pauseProducing(self) -> None:
            seen["pause"].append((self.counting.written if self.counting else -1, self.length))
            super().pauseProducing()

        def stopProducing(self) -> None:
            seen["stop"].append((self.counting.written if self.counting else -1, self.length))
            super().stopProducing()

    testcase.patch(forwarder, "MultipartProducer", Watched)
    return seen


class SlowReader(unittest.TestCase):
    async def test_paused_mid_file_and_stored_exactly(self) -> None:
        folder_api, _ = reference_api(self)
        api = SlowAPI(self, folder_api.site())
        relay = RelayUnderTest(self, api_url=api.url)
        ledger = Ledger(self, api)
        pauses = watch(self)["pause"]
        # The body more than the largest send buffer the kernel gives a
        # socket (tcp_wmem), so that it cannot take it all at once.
        head, size = 300_000, 5_000_000
        sent = header_section(head, 1) + message_body(size, 1)

        def talk() -> str:
            c = session(relay)
            try:
                return transact(c, sent)
            finally:
                c.close()

        reply = ledger.reply(await in_thread(talk))
        self.assertTrue(reply.startswith(QUEUED), reply)
        stored = await fetch_bytes(f"{api.url}/{queued_id(reply, alone=True)}/message")
        assert_stored(self, stored, sent, "slow")
        await ledger.check()
        # Paused inside the header section's write, and again while the
        # spooled body streamed.
        self.assertGreater(api.reads, 20)
        before_file = [w for w, _ in pauses if w <= head + 2000]
        mid_file = [w for w, length in pauses if head + 2000 < w < length]
        self.assertTrue(before_file, pauses[:10])
        self.assertGreater(len(mid_file), 3, pauses[:10])


    async def test_stopped_while_paused_mid_file(self) -> None:
        """An API that stops reading: the relay's deadline stops the body
        producer where the transport paused it, and the client gets its
        451 (and no error is logged, nothing stored); the session goes on."""
        folder_api, _ = reference_api(self)
        api = SlowAPI(self, folder_api.site(), delay=60.0)
        relay = relay_to(self, api.url, timeout=0.5)
        ledger = Ledger(self, api)
        seen = watch(self)
        # More than the largest send buffer the kernel gives a socket
        # (tcp_wmem), so that the producer is stopped before the end.
        first = header_section(100_000, 1) + message_body(6_000_000, 1)
        second = header_section(300, 2) + message_body(100, 2)

        def talk() -> tuple[str, str]:
            c = session(relay)
            try:
                timed_out = transact(c, first)
                api.delay = 0.001
                return timed_out, transact(c, second)
            finally:
                c.close()

        timed_out, queued = await in_thread(talk)
        self.assertEqual(ledger.reply(timed_out), TIMED_OUT)
        self.assertTrue(ledger.reply(queued).startswith(QUEUED), queued)
        stored = await fetch_bytes(f"{api.url}/{queued_id(queued, alone=True)}/message")
        assert_stored(self, stored, second, "after the timeout")
        await ledger.check()
        # Stopped once, mid-file, after a pause there.
        [(written, length)] = seen["stop"]
        self.assertTrue(100_000 < written < length, (written, length))
        self.assertTrue(any(100_000 < w <= written for w, _ in seen["pause"]), seen["pause"])
