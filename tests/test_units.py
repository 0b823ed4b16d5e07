"""The pure and timer-driven parts, cheaply: configuration, directory,
envelope syntax, SASL, password hashes, limits, timeouts (on a Clock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mxmrelay.auth import (
    FailureLimiter,
    decode_response,
    hash_password,
    parse_plain,
    verify_password,
)
from mxmrelay.config import Config, ConfigError
from mxmrelay.delivery import idempotency_key, new_send_id
from mxmrelay.directory import InvalidDirectory, TomlDirectory
from mxmrelay.envelope import parse_path_command
from mxmrelay.reply import Reply
from mxmrelay.rules import Envelope
from mxmrelay.smtp import SMTPFactory
from mxmrelay.tls import ImplicitTLSFactory, TLSConfigError, server_context
from tests.support import RelayUnderTest, config_dict, make_certificate


class Configuration(SynchronousTestCase):
    def folder(self) -> Path:
        p = Path(self.mktemp()).resolve()
        p.mkdir(parents=True)
        return p

    def test_valid(self) -> None:
        folder = self.folder()
        c = Config.from_dict(config_dict(folder, "https://api.test/v1/sends"), folder, "x.toml")
        self.assertEqual([x.role for x in c.listeners], ["smtp", "submission", "smtps"])
        self.assertEqual(c.max_message_size, 25 * 1024 * 1024)

    def test_errors_name_the_key(self) -> None:
        folder = self.folder()
        good = config_dict(folder, "https://api.test/v1/sends")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"listener": [{"role": "pop3", "endpoint": "tcp:1"}]}, "listener[0].role"),
            ({"bounce_address": "bounce@x"}, "bounce_address"),
            ({"delivery_api": {"url": "ftp://x", "token": "t"}}, "delivery_api.url"),
            ({"max_recipients": "many"}, "max_recipients"),
            ({"hostname": ""}, "hostname"),
        ]
        for change, key in cases:
            with self.assertRaises(ConfigError) as e:
                Config.from_dict({**good, **change}, folder, "x.toml")
            self.assertIn(f"x.toml: {key}: ", str(e.exception))

    def test_file_errors(self) -> None:
        folder = self.folder()
        bad = folder / "bad.toml"
        bad.write_text("hostname = \n")
        self.assertRaises(ConfigError, Config.from_file, bad)
        with self.assertRaises(ConfigError) as e:
            Config.from_file(folder / "missing.toml")
        self.assertIn("missing.toml: cannot read", str(e.exception))

    def test_directory_errors(self) -> None:
        customer = {"id": "c", "domains": ["example.com"], "flags": 1}
        user = {"email": "u@example.com", "password": hash_password("x", n=2), "customer": "c"}
        cases: list[tuple[dict[str, Any], str]] = [
            ({"customer": [{**customer, "flags": 16}], "user": []}, "customer[0].flags"),
            ({"customer": [{**customer, "domains": []}], "user": []}, "customer[0].domains"),
            ({"customer": [customer], "user": [{**user, "customer": "zz"}]}, "user[0].customer"),
            ({"customer": [customer], "user": [{**user, "password": "plain"}]},
             "user[0].password"),
            ({"customer": [customer, customer], "user": []}, "customer[1].id"),
        ]
        for data, key in cases:
            with self.assertRaises(InvalidDirectory) as e:
                TomlDirectory.from_dict(data, "dir.toml")
            self.assertIn(f"dir.toml: {key}: ", str(e.exception))

    def test_dev_files_are_valid(self) -> None:
        root = Path(__file__).parent.parent
        d = TomlDirectory.from_file(root / "etc" / "directory.dev.toml")
        demo = d.users["demo@example.com"].customer
        self.assertEqual((demo.id, demo.default_flags, demo.flags_for("news@example.com")),
                         ("demo", 1, 3))
        self.assertTrue(verify_password("demo-password", d.users["demo@example.com"].password_hash))
        self.assertTrue(verify_password("acme-password", d.users["ops@acme.test"].password_hash))
        c = Config.from_file(root / "etc" / "mxmrelay.dev.toml")
        self.assertEqual(sorted(x.endpoint for x in c.listeners), [
            "tcp:2465:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1",
            "tcp:2587:interface=127.0.0.1"])

    def test_space_owns(self) -> None:
        d = TomlDirectory.from_dict({"customer": [
            {"id": "a", "domains": ["Example.COM", "bücher.example"]},
            {"id": "b", "domains": ["sub.test"], "allow_subdomains": True}]}, "d")
        a, b = d.spaces["a"], d.spaces["b"]
        self.assertTrue(a.owns("x@example.com"))
        self.assertTrue(a.owns("x@EXAMPLE.com."))
        self.assertTrue(a.owns("x@xn--bcher-kva.example"))
        self.assertTrue(a.owns("x@bücher.example"))
        self.assertFalse(a.owns("x@mail.example.com"))
        self.assertFalse(a.owns("x@example.com.evil.test"))
        self.assertFalse(a.owns("example.com"))
        self.assertTrue(b.owns("x@mail.sub.test"))
        self.assertFalse(b.owns("x@evilsub.test"))


class TLSFiles(SynchronousTestCase):
    def test_bad_files_are_named(self) -> None:
        folder = Path(self.mktemp()).resolve()
        cert, key = make_certificate(folder)
        _, other_key = make_certificate(folder / "other")
        junk = folder / "junk.pem"
        junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        for c, k, named in [(folder / "nope.pem", key, "nope.pem"),
                            (cert, folder / "nokey", "nokey"),
                            (junk, key, "junk.pem"), (cert, junk, "junk.pem"),
                            (cert, other_key, "other/key.pem")]:
            with self.assertRaises(TLSConfigError) as e:
                server_context(c, k)
            self.assertIn(named, str(e.exception))
        server_context(cert, key)


class EnvelopeSyntax(SynchronousTestCase):
    def test_paths(self) -> None:
        ok = [
            ("FROM:<a@example.com>", "a@example.com"),
            ("FROM: <a@example.com>", "a@example.com"),
            ("from:a@example.com", "a@example.com"),
            ('FROM:<"john smith"@example.com>', '"john smith"@example.com'),
            ("FROM:<@relay.test,@b.test:a@example.com>", "a@example.com"),
            ("FROM:<a@[127.0.0.1]>", "a@[127.0.0.1]"),
            ("FROM:<a.b+tag@sub.example.com>", "a.b+tag@sub.example.com"),
            ("FROM:<>", ""),
        ]
        for arg, address in ok:
            self.assertEqual(parse_path_command(arg, which="FROM", esmtp=True).address, address)
        bad = ["FROM:<a@@example.com>", "FROM:<a@example..com>", "FROM:<.a@example.com>",
               "FROM:<a@-example.com>", "FROM:<a\x00@example.com>", "FROM:<a@exa mple.com>",
               "FROM:<" + "a" * 65 + "@example.com>", "FROM:<a@" + "b." * 130 + "com>",
               "FROM:<a@example.com", "FROM:<a>", "TO:<a@example.com>"]
        for arg in bad:
            with self.assertRaises(Reply) as e:
                parse_path_command(arg, which="FROM", esmtp=True)
            self.assertIn(e.exception.code, (501,), arg)

    def test_params(self) -> None:
        p = parse_path_command("FROM:<a@example.com> size=10 BODY=8BITMIME SMTPUTF8",
                               which="FROM", esmtp=True)
        self.assertEqual(p.params, {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None})
        with self.assertRaises(Reply) as e:
            parse_path_command("FROM:<a@example.com> SIZE=10", which="FROM", esmtp=False)
        self.assertEqual(e.exception.code, 555)
        with self.assertRaises(Reply):
            parse_path_command("FROM:<a@example.com> SIZE=", which="FROM", esmtp=True)


class SASL(SynchronousTestCase):
    def test_decode(self) -> None:
        self.assertEqual(decode_response(b"="), b"")
        self.assertEqual(decode_response(b"YQ=="), b"a")
        for bad, code in [(b"*", 501), (b"YQ", 501), (b"Y Q==", 501), (b"\xff", 501)]:
            with self.assertRaises(Reply) as e:
                decode_response(bad)
            self.assertEqual(e.exception.code, code)

    def test_plain(self) -> None:
        self.assertEqual(parse_plain(b"\0u@x\0pw"), ("u@x", "pw"))
        self.assertEqual(parse_plain(b"U@X\0u@x\0pw"), ("u@x", "pw"))
        with self.assertRaises(Reply) as e:
            parse_plain(b"admin@x\0u@x\0pw")
        self.assertEqual(e.exception.code, 535)
        for bad in (b"u@x\0pw", b"\0\0pw", b"\0\xff\0pw", b"a\0b\0c\0d"):
            self.assertRaises(Reply, parse_plain, bad)


class Passwords(SynchronousTestCase):
    def test_hash_and_verify(self) -> None:
        h = hash_password("s3cret", n=2**4)
        self.assertTrue(h.startswith("scrypt$n=16,r=8,p=1$"))
        self.assertTrue(verify_password("s3cret", h))
        self.assertFalse(verify_password("s3cret!", h))
        self.assertNotEqual(h, hash_password("s3cret", n=2**4))
        for broken in ("", "scrypt$x", "bcrypt$a$b$c", "scrypt$n=16,r=8,p=1$!!$!!"):
            self.assertFalse(verify_password("s3cret", broken))


class Limits(SynchronousTestCase):
    def test_window(self) -> None:
        clock = Clock()
        limiter = FailureLimiter(clock, limit=2, window=60)
        limiter.record("a")
        self.assertFalse(limiter.blocked("a"))
        limiter.record("a")
        self.assertTrue(limiter.blocked("a"))
        self.assertFalse(limiter.blocked("b"))
        clock.advance(61)
        self.assertFalse(limiter.blocked("a"))

    def test_bounded_table(self) -> None:
        limiter = FailureLimiter(Clock(), limit=1, window=60, max_keys=100)
        for i in range(1000):
            limiter.record(str(i))
        self.assertEqual(len(limiter._seen), 100)
        self.assertTrue(limiter.blocked("999"))


class SendIds(SynchronousTestCase):
    def test_shape_and_order(self) -> None:
        a = new_send_id(1_700_000_000.0, b"\0" * 10)
        b = new_send_id(1_700_000_000.001, b"\0" * 10)
        self.assertEqual(len(a), 26)
        self.assertRegex(a, r"^[0-9a-hjkmnp-tv-z]{26}$")
        self.assertLess(a, b)
        self.assertEqual(len({new_send_id() for _ in range(10_000)}), 10_000)

    def test_idempotency_key(self) -> None:
        env = Envelope("a@example.com", ("b@example.org",))
        head = b"Message-ID: <m@x>\r\nSubject: a\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        k = idempotency_key("demo", env, head, b"d" * 32)
        self.assertRegex(k, r"^[0-9a-f]{64}$")
        # A retry that wrote its Date (or a Received) anew is the same send.
        for retry in (head.replace(b"00:00:00", b"00:05:00"),
                      head.replace(b"Date: Mon, 1 Jan 2024", b"DATE:\r\n Tue, 2 Jan 2024"),
                      b"Received: from x\r\n\tby y; now\r\n" + head):
            self.assertEqual(idempotency_key("demo", env, retry, b"d" * 32), k, retry)
        others = {
            idempotency_key("acme", env, head, b"d" * 32),
            idempotency_key("demo", Envelope("a@example.com", ("c@example.org",)), head,
                            b"d" * 32),
            idempotency_key("demo", env, head.replace(b"<m@x>", b"<n@x>"), b"d" * 32),
            idempotency_key("demo", env, head, b"e" * 32),
            # the same Message-ID on a different message: a different send
            idempotency_key("demo", env, head.replace(b"Subject: a", b"Subject: b"), b"d" * 32),
        }
        self.assertEqual(len(others | {k}), 6)


class Timers(TestCase):
    """Idle timeout, the implicit-TLS hint, shutdown: on a Clock."""

    def setUp(self) -> None:
        self.relay = RelayUnderTest(self)
        self.clock = Clock()

    def connect(self, factory: object) -> StringTransport:
        proto = factory.buildProtocol(None)  # type: ignore[attr-defined]
        transport = StringTransport()
        proto.makeConnection(transport)
        return transport

    def test_idle_timeout(self) -> None:
        t = self.connect(SMTPFactory(self.relay.relay.settings, "submission", self.clock))
        self.assertTrue(t.value().startswith(b"220 "))
        self.clock.advance(299)
        self.assertFalse(t.disconnecting)
        self.clock.advance(2)
        self.assertTrue(t.value().endswith(b"421 4.4.2 relay.test Timeout exceeded\r\n"))
        self.assertTrue(t.disconnecting)

    def test_silence_on_implicit_tls_port(self) -> None:
        smtp = SMTPFactory(self.relay.relay.settings, "smtps", self.clock)
        front = ImplicitTLSFactory(TLSMemoryBIOFactory(self.relay.relay.tls, False, smtp),
                                   self.clock, 5.0)
        t = self.connect(front)
        self.assertEqual(t.value(), b"")
        self.clock.advance(5)
        self.assertTrue(t.value().startswith(b"554 5.7.0 This port needs TLS"))
        self.assertTrue(t.disconnecting)

    def test_shutdown_says_goodbye(self) -> None:
        factory = SMTPFactory(self.relay.relay.settings, "submission", self.clock)
        t = self.connect(factory)
        factory.shutdown()
        self.assertTrue(t.value().endswith(b"421 4.3.2 Service shutting down\r\n"))
        self.assertTrue(t.disconnecting)


class CredentialCaching(SynchronousTestCase):
    def test_cache(self) -> None:
        from mxmrelay.auth import CredentialCache
        from mxmrelay.directory import CustomerSpace, User

        space = CustomerSpace(id="c", name="c", domains=frozenset({"example.com"}))
        user = User("u@example.com", "scrypt$hash-one", space)
        clock = Clock()
        cache = CredentialCache(clock, ttl=60)
        self.assertFalse(cache.hit(user, "pw"))
        cache.remember(user, "pw")
        self.assertTrue(cache.hit(user, "pw"))
        self.assertTrue(cache.hit(User("U@EXAMPLE.COM", "scrypt$hash-one", space), "pw"))
        self.assertFalse(cache.hit(user, "pw2"))
        self.assertFalse(cache.hit(User("u@example.com", "scrypt$hash-two", space), "pw"))
        clock.advance(61)
        self.assertFalse(cache.hit(user, "pw"))
        off = CredentialCache(clock, ttl=0)
        off.remember(user, "pw")
        self.assertFalse(off.hit(user, "pw"))
        small = CredentialCache(clock, ttl=60, max_entries=10)
        for i in range(50):
            small.remember(User(f"u{i}@example.com", "h", space), "pw")
        self.assertEqual(len(small._entries), 10)


class WorkersSetting(SynchronousTestCase):
    def test_auto_and_count(self) -> None:
        import os

        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        base = config_dict(folder, "https://api.test/v1/sends")
        self.assertEqual(Config.from_dict(base, folder, "x").workers, 1)
        auto = Config.from_dict({**base, "workers": "auto"}, folder, "x").workers
        self.assertEqual(auto, len(os.sched_getaffinity(0)))
        self.assertEqual(Config.from_dict({**base, "workers": 3}, folder, "x").workers, 3)
        for bad in (0, "many", 1.5):
            self.assertRaises(ConfigError, Config.from_dict, {**base, "workers": bad}, folder, "x")


class HugeAddressFields(SynchronousTestCase):
    def test_only_the_first_mailboxes_are_read(self) -> None:
        from mxmrelay import addresses, rules

        field = b"To: x@example.org," + b"a," * 500_000 + b"\r\n"
        boxes = addresses.mailboxes(field, 4, len(field) - 2)
        self.assertEqual(len(boxes[0]), addresses.MAX_MAILBOXES)
        space = TomlDirectory.from_dict({"customer": [
            {"id": "c", "domains": ["example.com"]}]}, "d").spaces["c"]
        sent = rules.apply_rules(Envelope("a@example.com", ("x@example.org",)),
                                 b"From: a@example.com\r\n" + field, space, send_id="i",
                                 bounce_template="b+{id}@x", received=b"Received: x\r\n")
        assert isinstance(sent, rules.Send)
        self.assertEqual(sent.to, "x@example.org")


class Networks(SynchronousTestCase):
    def test_what_per_address_limits_count(self) -> None:
        from mxmrelay.connection import ConnectionInfo, network_of

        self.assertEqual(network_of("192.0.2.7"), "192.0.2.7")
        self.assertEqual(network_of("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(network_of("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(network_of("2001:db8:1:2::99"), network_of("2001:db8:1:2:ffff::1"))
        self.assertNotEqual(network_of("2001:db8:1:2::1"), network_of("2001:db8:1:3::1"))
        self.assertEqual(network_of("not-an-ip"), "not-an-ip")
        s = ConnectionInfo(client="2001:db8::1", listener="submission")
        self.assertEqual(s.network, "2001:db8::/64")
        s.move("198.51.100.1")
        self.assertEqual((s.client, s.network), ("198.51.100.1", "198.51.100.1"))


class ReferenceAPIMoved(SynchronousTestCase):
    def test_its_table_is_one_line_saying_where_it_went(self) -> None:
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({"reference_api": {"endpoint": "tcp:0", "database": "api.sqlite3",
                                                "token": "t"}}, folder, "api.toml")
        self.assertEqual(str(e.exception).splitlines(), [
            "api.toml: reference_api: the reference API now runs on its own, as "
            "`twistd mxmrelay-refapi --config FILE` (see the README)"])

    def test_the_relay_always_needs_listeners(self) -> None:
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({}, folder, "x")
        self.assertIn("x: listener: no [[listener]]: nothing to run", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({"listener": [{"role": "smtp", "endpoint": "tcp:0"}]}, folder, "x")
        self.assertIn("x: hostname: ", str(e.exception))


class Draining(TestCase):
    def test_goodbye_waits_for_connections_then_the_grace(self) -> None:
        from mxmrelay.service import _Goodbye

        relay = RelayUnderTest(self)
        clock = Clock()
        factory = SMTPFactory(relay.relay.settings, "submission", clock)
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto._busy = True  # as if a send were in flight
        goodbye = _Goodbye([factory], clock, grace=30)
        goodbye.startService()
        stopped = goodbye.stopService()
        self.assertNoResult(stopped)
        proto.connectionLost()
        self.successResultOf(stopped)
        # and a connection that never ends is cut off after the grace
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto._busy = True
        goodbye.startService()
        stopped = goodbye.stopService()
        clock.advance(29)
        self.assertNoResult(stopped)
        clock.advance(2)
        self.successResultOf(stopped)
