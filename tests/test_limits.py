"""The sending limits' arithmetic and the session's use of it, on a Clock."""

from __future__ import annotations

import math

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mxmrelay.config import Config
from mxmrelay.directory import CustomerSpace, TomlDirectory, User
from mxmrelay.limiter import Limiter, Reservation, SharedState
from mxmrelay.limits import Limits, LocalState, Overrides, Refusal, seconds
from mxmrelay.reply import Reply
from mxmrelay.transaction import Transaction

SPACE = CustomerSpace(id="acme", name="Acme", domains=frozenset({"acme.test"}))


def user(space: CustomerSpace = SPACE, networks: tuple[str, ...] | None = None) -> User:
    import ipaddress

    nets = None if networks is None else tuple(ipaddress.ip_network(n) for n in networks)
    return User(email="u@acme.test", password_hash="x", customer=space, allowed_networks=nets)


class Arithmetic(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000.0)
        self.state = LocalState(self.clock)

    def test_rate_burst_then_exact_retry(self) -> None:
        """Five a second, burst five: five at once, the sixth is told 0.2 s,
        and is accepted after exactly that long (not a millisecond before)."""
        limits = Limits(rate=5)
        for _ in range(5):
            self.assertNotIsInstance(self.state.reserve("acme", limits), Refusal)
        refusal = self.state.reserve("acme", limits)
        assert isinstance(refusal, Refusal)
        self.assertEqual((refusal.limit, seconds(refusal.retry_after)), ("rate", "0.2"))
        self.assertIn("retry-after=0.2", refusal.text())
        self.clock.advance(0.199)
        self.assertIsInstance(self.state.reserve("acme", limits), Refusal)
        self.clock.advance(0.001)
        self.assertNotIsInstance(self.state.reserve("acme", limits), Refusal)

    def test_daily_quota_until_midnight_utc(self) -> None:
        limits = Limits(daily=3)
        for _ in range(3):
            self.assertNotIsInstance(self.state.reserve("acme", limits), Refusal)
        refusal = self.state.reserve("acme", limits)
        assert isinstance(refusal, Refusal)
        midnight = (self.clock.seconds() // 86400 + 1) * 86400
        self.assertEqual(refusal.limit, "daily")
        self.assertAlmostEqual(refusal.retry_after, midnight - self.clock.seconds())
        self.clock.advance(math.ceil(refusal.retry_after * 1000) / 1000)
        self.assertNotIsInstance(self.state.reserve("acme", limits), Refusal)

    def test_given_back_uses_nothing(self) -> None:
        limits = Limits(rate=1, daily=1)
        taken = self.state.reserve("acme", limits)
        assert isinstance(taken, tuple)
        self.state.give_back("acme", *taken)
        self.assertNotIsInstance(self.state.reserve("acme", limits), Refusal)
        self.assertIsInstance(self.state.reserve("acme", limits), Refusal)

    def test_refused_rate_takes_no_quota(self) -> None:
        """The rate and the quota are checked before either is counted."""
        limits = Limits(rate=1, daily=2)
        self.state.reserve("acme", limits)
        self.assertIsInstance(self.state.reserve("acme", limits), Refusal)
        self.clock.advance(1)
        self.assertNotIsInstance(self.state.reserve("acme", limits), Refusal)

    def test_sessions(self) -> None:
        self.assertTrue(self.state.open_session("u", "a", 2))
        self.assertTrue(self.state.open_session("u", "b", 2))
        self.assertFalse(self.state.open_session("u", "c", 2))
        self.state.close_session("u", "a")
        self.assertTrue(self.state.open_session("u", "c", 2))

    def test_overrides_and_unlimited(self) -> None:
        defaults = Limits(rate=5, daily=100)
        mine = defaults.override(Overrides(daily=math.inf, burst=2))
        self.assertEqual((mine.rate, mine.bucket, mine.daily), (5, 2, math.inf))


class Sessions(SynchronousTestCase):
    """The limiter as the realm and the avatar call it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = Limiter(Limits(rate=1, sessions=1), SharedState(LocalState(self.clock)))

    def test_mail_from_refusal_reply(self) -> None:
        self.successResultOf(self.limiter.reserve(user(), "192.0.2.1"))
        f = self.failureResultOf(self.limiter.reserve(user(), "192.0.2.1"), Reply)
        self.assertEqual(str(f.value), "451 4.7.1 Sending rate limit reached (1 per second, "
                                       "burst 1); retry-after=1")

    def test_transaction_gives_back_unless_250(self) -> None:
        """RSET (abandon before DATA) gives the send back; the next MAIL
        then needs no wait."""
        reservation = self.successResultOf(self.limiter.reserve(user(), "192.0.2.1"))
        assert isinstance(reservation, Reservation)
        Transaction("a@acme.test", False, reservation=reservation).abandon()
        self.successResultOf(self.limiter.reserve(user(), "192.0.2.1"))

    def test_session_limit_421(self) -> None:
        free = self.successResultOf(self.limiter.login(user(), "192.0.2.1"))
        f = self.failureResultOf(self.limiter.login(user(), "192.0.2.1"), Reply)
        self.assertEqual(str(f.value), "421 4.7.0 Too many sessions for this user (limit 1)")
        free()
        self.successResultOf(self.limiter.login(user(), "192.0.2.1"))

    def test_allowed_networks_535(self) -> None:
        inside = user(networks=("192.0.2.0/24", "2001:db8::/32"))
        self.successResultOf(self.limiter.login(inside, "::ffff:192.0.2.9"))
        f = self.failureResultOf(self.limiter.login(inside, "198.51.100.1"), Reply)
        self.assertEqual(str(f.value), "535 5.7.8 Authentication credentials invalid")


class Configuration(SynchronousTestCase):
    def test_keys(self) -> None:
        from pathlib import Path

        base = {"hostname": "h", "directory": "d.toml", "delivery_api": {"url": "http://x/",
                "token": "t"}, "listener": [{"role": "smtp", "endpoint": "tcp:25"}],
                "tls": {"certificate": "c", "private_key": "k"},
                "bounce_address": "{id}@b.test"}
        config = Config.from_dict({**base, "limits": {"sends_per_second": 5, "sends_per_day":
                                   "unlimited"}, "state": {"redis": "redis://127.0.0.1:1/0"}},
                                  Path("."), "c.toml")
        self.assertEqual((config.limits.rate, config.limits.daily), (5, math.inf))
        self.assertEqual(config.state.redis, "redis://127.0.0.1:1/0")
        from mxmrelay.config import ConfigError

        e = self.assertRaises(ConfigError, Config.from_dict, {**base, "limits": {
            "sends_per_day": 0.5, "burst": 0}, "state": {"redis": "http://x"}}, Path("."),
            "c.toml")
        self.assertEqual(sorted(p.key for p in e.problems),
                         ["limits.burst", "limits.sends_per_day", "state.redis"])

    def test_directory_overrides(self) -> None:
        d = TomlDirectory.from_dict({"customer": [{"id": "a", "domains": ["a.test"],
                                     "sends_per_second": 5, "sends_per_day": 100,
                                     "allowed_networks": ["192.0.2.0/24"]}],
                                     "user": [{"email": "u@a.test", "customer": "a",
                                               "password": _hash(),
                                               "allowed_networks": ["198.51.100.7"]}]}, "d")
        space = d.spaces["a"]
        self.assertEqual((space.limits.rate, space.limits.daily), (5, 100))
        self.assertEqual(str(d.users["u@a.test"].allowed_networks[0]),  # type: ignore[index]
                         "198.51.100.7/32")


def _hash() -> str:
    from mxmrelay.hashes import hash_password

    return hash_password("pw")
