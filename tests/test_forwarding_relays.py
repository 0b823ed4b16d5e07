"""The hop to the delivery API, end to end: two relays in front of one
API, redirects, the connection pool, HTTPS with a private CA, and a send
in flight at shutdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IReactorSSL
from twisted.internet.protocol import ServerFactory
from twisted.trial import unittest

from mxmrelay_refapi.api import ReferenceAPI
from tests.forwarding_support import (
    Canned,
    Ledger,
    error,
    injected,
    reference_api,
    relay_to,
    send_once,
    session,
    stuffed,
    transact,
)
from tests.helpers import QUEUED, listen, port_number, until
from tests.support import RelayUnderTest, fetch_json, in_thread, message

# --------------------------------------------------------------------------
# 4. Two relays, one API


class TwoRelays(unittest.TestCase):
    async def test_concurrent_distinct(self) -> None:
        _, api = reference_api(self)
        relays = [RelayUnderTest(self, api_url=api.url) for _ in range(2)]
        ledger = Ledger(self, api)

        def worker(relay: RelayUnderTest, n: int) -> list[str]:
            c = session(relay)
            try:
                return [transact(c, message(f"Relay {n} message {i}")) for i in range(3)]
            finally:
                c.close()

        results = await gatherResults(
            [in_thread(worker, relays[n % 2], n) for n in range(8)])
        replies = [ledger.reply(r) for rs in results for r in rs]
        self.assertEqual(len(replies), 24)
        for r in replies:
            self.assertTrue(r.startswith(QUEUED), r)
        self.assertEqual(len(set(ledger.accepted)), 24)
        self.assertEqual(len(await ledger.check()), 24)

    async def test_failover_same_message(self) -> None:
        """A client that fails over to the other relay sends one send."""
        _, api = reference_api(self)
        a, b = (RelayUnderTest(self, api_url=api.url) for _ in range(2))
        ledger = Ledger(self, api)
        data = message("Failover")
        first = ledger.reply(await in_thread(send_once, a, data))
        self.assertTrue(first.startswith(QUEUED), first)
        self.assertEqual(ledger.reply(await in_thread(send_once, b, data)), first)
        self.assertEqual(len(await ledger.check()), 1)

    async def test_same_message_racing(self) -> None:
        """Both relays' POSTs of one message reach the API together."""
        injector, front, api = injected(self)
        injector.gate = 2
        a, b = relay_to(self, front.url), relay_to(self, front.url)
        ledger = Ledger(self, api)
        data = message("Race")
        replies = await gatherResults([in_thread(send_once, r, data) for r in (a, b)])
        for r in replies:
            ledger.reply(r)
        self.assertEqual(replies[0], replies[1])
        self.assertTrue(replies[0].startswith(QUEUED), replies)
        codes = sorted([(await injector.answers.get())[0] for _ in range(2)])
        self.assertEqual(codes, [200, 201])
        self.assertEqual(len(await ledger.check()), 1)


# --------------------------------------------------------------------------
# 5. Redirects


class Redirects(unittest.TestCase):
    async def test_not_followed(self) -> None:
        """A redirect (even to the real API) is not followed: the POST is
        not replayed elsewhere.  A redirect means the relay's URL is wrong,
        an operator's problem: ``451 4.3.0``, the client keeps the message."""
        injector, front, api = injected(self)
        relay = relay_to(self, front.url)
        ledger = Ledger(self, api)
        codes = (301, 302, 303, 307, 308)
        replies: list[str] = []
        c = await in_thread(session, relay)
        try:
            for code in codes:
                injector.mode = Canned(code, b"", ((b"Location", api.url.encode()),))
                replies.append(ledger.reply(await in_thread(transact, c,
                                                            message(f"Redirect {code}"))))
        finally:
            await in_thread(c.close)
        self.assertEqual(replies, [f"451 4.3.0 Temporary failure, try again later "
                                   f"(delivery API answered {code})" for code in codes])
        self.assertEqual(injector.posts, len(codes))
        self.assertEqual(api.accepted, 0, "the API was contacted")
        self.assertEqual(await ledger.check(), [])


# --------------------------------------------------------------------------
# 6. The connection pool


class Pool(unittest.TestCase):
    async def test_one_persistent_connection(self) -> None:
        injector, front, api = injected(self)
        relay = relay_to(self, front.url)
        ledger = Ledger(self, api)

        def talk(subjects: list[str]) -> list[str]:
            c = session(relay)
            try:
                return [transact(c, message(s)) for s in subjects]
            finally:
                c.close()

        replies = await in_thread(talk, ["Pool 1", "Pool 2"])
        replies += await in_thread(talk, ["Pool 3"])  # another SMTP session
        injector.mode = error(503)  # an error answer does not cost the connection
        replies += await in_thread(talk, ["Pool 4"])
        injector.mode = "pass"
        replies += await in_thread(talk, ["Pool 5"])
        self.assertEqual([r[:4] for r in map(ledger.reply, replies)],
                         ["250 ", "250 ", "250 ", "451 ", "250 "])
        self.assertEqual(front.accepted, 1)
        self.assertEqual(injector.posts, 5)

        # The API drops its idle connections: the next send opens a new one.
        await front.drop()
        reply = ledger.reply(await in_thread(send_once, relay, message("Pool 6")))
        self.assertTrue(reply.startswith(QUEUED), reply)
        self.assertEqual(front.accepted, 2)
        self.assertEqual(len(await ledger.check()), 5)


# --------------------------------------------------------------------------
# 7. HTTPS to the API: verification on, a private CA by configuration


class HTTPS(unittest.TestCase):
    async def test_verified_with_ca_file_refused_without(self) -> None:
        from mxmrelay.forwarder import Forwarder
        from mxmrelay.service import Relay
        from mxmrelay.tls import server_context
        from tests.support import TOKEN, directory, make_certificate

        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        cert, key = make_certificate(folder / "api-tls", "localhost")
        api = ReferenceAPI.open(folder / "api.sqlite3", TOKEN, reactor=reactor)
        self.addCleanup(api.close)
        # listenSSL takes any IProtocolFactory; its annotation says
        # ServerFactory, generic in a protocol type few factories state.
        port = IReactorSSL(reactor).listenSSL(0, cast("ServerFactory[Any]", api.site()),
                                              server_context(cert, key), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"https://localhost:{port_number(port)}/v1/sends"

        async def send_via(ca_file: Path | None) -> tuple[int, bytes]:
            relay = RelayUnderTest(self, api_url=url)
            forwarder = Forwarder(reactor, url, TOKEN, 10, ca_file)
            self.addCleanup(forwarder.close)
            relay.relay = Relay.build(relay.config, reactor, forwarder, directory())
            listening, relay.ports["smtps"] = listen(relay.relay.factory("smtps"))
            self.addCleanup(listening.stopListening)

            def talk() -> tuple[int, bytes]:
                c = relay.smtp("smtps")
                c.mail("app@example.com")
                c.rcpt("someone@example.org")
                result = c.data(message("https " + str(ca_file)))
                c.quit()
                return result

            return await in_thread(talk)

        code, text = await send_via(cert)
        self.assertEqual(code, 250, text)
        code, text = await send_via(None)  # the system store does not know our CA
        self.assertEqual(code, 451, text)
        self.assertEqual(text, b"4.7.5 TLS to delivery API failed, try again later")
        # Read what was stored over a plain listener of the same API.
        plain, number = listen(api.site())
        self.addCleanup(plain.stopListening)
        listed = await fetch_json(f"http://127.0.0.1:{number}/v1/sends")
        self.assertEqual(len(listed["sends"]), 1)


# --------------------------------------------------------------------------
# 8. Shutdown while a send is in flight


class Shutdown(unittest.TestCase):
    async def test_send_in_flight_gets_its_answer_first(self) -> None:
        injector, front, _ = injected(self)
        injector.mode = "hang"
        relay = relay_to(self, front.url)

        def talk() -> list[str]:
            c = relay.raw().ready()
            c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<someone@example.org>\r\nDATA\r\n")
            answers = [c.reply() for _ in range(3)]
            c.send(stuffed(message("in flight at shutdown")) + b".\r\n")
            answers += [c.reply(), c.reply()]
            answers.append("closed" if c.closed() else "open")
            return answers

        talking = in_thread(talk)
        await until(lambda: bool(injector.held), "the POST to arrive")
        for factory in relay.relay.factories:
            factory.shutdown()  # what the service does as it stops
        [request] = injector.held
        request.setResponseCode(201)
        request.setHeader(b"Content-Type", b"application/json")
        request.write(b'{"id": "held-send-1"}')
        request.finish()
        answers = await talking
        self.assertEqual([answers[3].split("\n")[-1], *answers[4:]],
                         ["250 2.0.0 Ok: queued as held-send-1",
                          "421 4.3.2 Service shutting down", "closed"])
