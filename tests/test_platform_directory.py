"""The platform directory, pure: the cache's timing rules on a Clock, the
shared request, the answers (through the reference API's own route, over
StubTreq), and the contract's schema against the relay's reading of it."""

from __future__ import annotations

import ipaddress
import json
import math
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from mxmrelay.directory import CustomerSpace, DirectoryError, User
from mxmrelay.directory_cache import DirectoryCache
from mxmrelay.hashes import hash_password
from mxmrelay.limits import NO_OVERRIDES, Overrides
from mxmrelay.platform_directory import PlatformDirectory, parse_answer
from mxmrelay_refapi.users import Users
from mxmrelay_refapi.web import Routes
from tests.test_hashes import php_hash
from tests.test_refapi_contract import Spec, probes

SPACE = CustomerSpace("c", "C", frozenset({"example.com"}))


def user(email: str = "a@example.com", hash_: str = "h") -> User:
    return User(email, hash_, SPACE)


class Fetches:
    """A fetch function whose Deferreds the test fires."""

    def __init__(self) -> None:
        self.pending: list[Deferred[User | None]] = []

    def __call__(self) -> Deferred[User | None]:
        d: Deferred[User | None] = Deferred()
        self.pending.append(d)
        return d


class CacheTimings(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = DirectoryCache(self.clock, ttl=60, negative_ttl=10, stale_ttl=300,
                                    max_entries=3)
        self.fetch = Fetches()

    def ask(self, key: str = "a@example.com") -> Deferred[User | None]:
        return self.cache.lookup(key, self.fetch)

    def test_found_user_is_reused_for_ttl(self) -> None:
        d = self.ask()
        self.fetch.pending[0].callback(user())
        self.assertEqual(self.successResultOf(d), user())
        self.clock.advance(59.9)
        self.assertEqual(self.successResultOf(self.ask()), user())
        self.assertEqual(len(self.fetch.pending), 1)
        self.clock.advance(0.1)
        self.assertNoResult(self.ask())
        self.assertEqual(len(self.fetch.pending), 2)

    def test_unknown_user_is_reused_for_negative_ttl(self) -> None:
        d = self.ask()
        self.fetch.pending[0].callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.clock.advance(9.9)
        self.assertIsNone(self.successResultOf(self.ask()))
        self.clock.advance(0.1)
        self.assertNoResult(self.ask())
        self.assertEqual(len(self.fetch.pending), 2)

    def test_concurrent_lookups_share_one_request(self) -> None:
        first, second, third = self.ask(), self.ask(), self.ask("b@example.com")
        self.assertEqual(len(self.fetch.pending), 2)
        first.cancel()  # one caller giving up leaves the others their answer
        self.failureResultOf(first)
        self.fetch.pending[0].callback(user())
        self.assertEqual(self.successResultOf(second), user())
        self.assertNoResult(third)
        self.assertEqual(self.cache.counts["shared"], 1)

    def test_failure_serves_a_known_user_for_stale_ttl_only(self) -> None:
        self.ask()
        self.fetch.pending[0].callback(user())
        self.clock.advance(299)
        d = self.ask()
        self.fetch.pending[1].errback(DirectoryError("platform down"))
        self.assertEqual(self.successResultOf(d), user())
        self.clock.advance(1)
        d = self.ask()
        self.fetch.pending[2].errback(DirectoryError("platform down"))
        self.failureResultOf(d, DirectoryError)

    def test_failure_for_an_unknown_or_new_user_is_a_failure(self) -> None:
        self.ask()
        self.fetch.pending[0].callback(None)
        self.clock.advance(10)
        d = self.ask()
        self.fetch.pending[1].errback(DirectoryError("down"))
        self.failureResultOf(d, DirectoryError)
        d = self.ask("new@example.com")
        self.fetch.pending[2].errback(DirectoryError("down"))
        self.failureResultOf(d, DirectoryError)

    def test_changed_answer_replaces_the_old_after_ttl(self) -> None:
        self.ask()
        self.fetch.pending[0].callback(user(hash_="old"))
        self.clock.advance(60)
        d = self.ask()
        self.fetch.pending[1].callback(user(hash_="new"))
        self.assertEqual(self.successResultOf(d).password_hash, "new")  # type: ignore[union-attr]

    def test_memory_is_bounded_least_recently_used_first(self) -> None:
        for name in "abcd":
            self.ask(f"{name}@x")
            self.fetch.pending[-1].callback(user(f"{name}@x"))
            if name == "c":
                self.ask("a@x")  # a is used again: b is now the oldest
        self.assertEqual(len(self.fetch.pending), 4)
        self.successResultOf(self.ask("a@x"))
        self.assertNoResult(self.ask("b@x"))


def users_file(folder: Path, password_hash: str) -> Path:
    path = folder / "directory.toml"
    path.write_text(f"""
[[customer]]
id = "demo"
name = "Demo"
domains = ["example.com"]
flags = 1
allow_subdomains = true
[customer.from_flags]
"news@example.com" = 3

[[user]]
email = "Demo@example.com"
password = "{password_hash}"
customer = "demo"
""")
    return path


#: A space with every sending limit and ``explain``, and users with and
#: without their own networks (and a sandbox one).
LIMITS_FILE = """
[[customer]]
id = "capped"
domains = ["capped.test"]
explain = false
sends_per_second = 0.5
burst = 20
sends_per_day = "unlimited"
sessions_per_user = 3
allowed_networks = ["192.0.2.0/24", "2001:db8::/32"]

[[user]]
email = "office@capped.test"
password = "{hash}"
customer = "capped"
allowed_networks = ["198.51.100.7"]
sandbox = true

[[user]]
email = "any@capped.test"
password = "{hash}"
customer = "capped"
"""

CAPPED = Overrides(rate=0.5, burst=20, daily=math.inf, sessions=3,
                   allowed_networks=(ipaddress.ip_network("192.0.2.0/24"),
                                     ipaddress.ip_network("2001:db8::/32")))


class Answers(unittest.TestCase):
    """The relay's PlatformDirectory against the reference API's route."""

    #: The reference API's route, over StubTreq (``directory`` sets it).
    stub: Any

    def directory(self, password_hash: str, token: bytes = b"t",
                  text: str | None = None) -> PlatformDirectory:
        folder = Path(self.mktemp())
        folder.mkdir()
        if text is None:
            path = users_file(folder, password_hash)
        else:
            path = folder / "directory.toml"
            path.write_text(text.format(hash=password_hash))
        routes = Routes(db=None, token=token, users=Users.open(path))  # type: ignore[arg-type]
        stub: Any = StubTreq(routes.resource())
        self.stub = stub
        cache = DirectoryCache(Clock(), 60, 10, 300)
        return PlatformDirectory(Clock(), "http://platform/v1/smtp-users", "t", 5, cache, stub)

    async def test_known_and_unknown_users(self) -> None:
        directory = self.directory(php_hash("pw"))
        found = await directory.find_user("DEMO@example.com")
        assert found is not None
        self.assertEqual((found.email, found.customer.id, found.customer.default_flags),
                         ("Demo@example.com", "demo", 1))
        self.assertTrue(found.customer.owns("x@sub.example.com"))
        self.assertEqual(found.customer.flags_for("News@example.com"), 3)
        self.assertIsNone(await directory.find_user("nobody@example.com"))
        self.assertIsNone(await directory.find_user("no-at-sign"))

    async def test_limits_and_user_networks_are_served_and_read(self) -> None:
        """The reference API answers the file's limits, ``explain`` and the
        user's ``allowed_networks`` and ``sandbox`` as written, and the relay
        reads them as it reads the file."""
        directory = self.directory(php_hash("pw"), text=LIMITS_FILE)
        response = await self.stub.get("http://platform/v1/smtp-users/office@capped.test",
                                       headers={"Authorization": ["Bearer t"]})
        answer = json.loads(await self.stub.content(response))
        self.assertEqual(response.code, 200)
        self.assertTrue(Spec().validator("/components/schemas/SMTPUser").is_valid(answer))
        limit_keys = ("explain", "sends_per_second", "burst", "sends_per_day",
                      "sessions_per_user", "allowed_networks")
        self.assertEqual({k: answer["customer"].get(k) for k in limit_keys},
                         {"explain": False, "sends_per_second": 0.5, "burst": 20,
                          "sends_per_day": "unlimited", "sessions_per_user": 3,
                          "allowed_networks": ["192.0.2.0/24", "2001:db8::/32"]})
        self.assertEqual((answer["allowed_networks"], answer["sandbox"]),
                         (["198.51.100.7"], True))
        office = await directory.find_user("office@capped.test")
        assert office is not None
        self.assertEqual((office.customer.limits, office.customer.explain,
                          office.allowed_networks, office.sandbox),
                         (CAPPED, False, (ipaddress.ip_network("198.51.100.7/32"),), True))
        anyone = await directory.find_user("any@capped.test")
        assert anyone is not None
        self.assertEqual((anyone.customer.limits, anyone.allowed_networks, anyone.sandbox),
                         (CAPPED, None, False))

    async def test_bad_answers_are_directory_errors(self) -> None:
        for directory in [self.directory("$1$md5$crypt"), self.directory("x", token=b"other")]:
            await self.assertFailure(directory.find_user("demo@example.com"), DirectoryError)
        self.flushLoggedErrors()


VALID = {"email": "a@example.com", "password_hash": hash_password("x", n=2**4),
         "customer": {"id": "c", "name": "C", "domains": ["example.com"], "flags": 0,
                      "from_flags": {}, "allow_subdomains": False}}


class LimitsInAnswers(unittest.SynchronousTestCase):
    """A space's sending limits and a user's networks, read from an answer."""

    def test_read_as_the_file_is(self) -> None:
        customer = {**VALID["customer"], "sends_per_second": 0.5, "burst": 20.0,  # type: ignore[dict-item]
                    "sends_per_day": "unlimited", "sessions_per_user": 3,
                    "allowed_networks": ["192.0.2.0/24", "2001:db8::/32"]}
        found = parse_answer(200, json.dumps({
            **VALID, "customer": customer, "allowed_networks": ["198.51.100.0/24"],
        }).encode(), "a@example.com")
        assert found is not None
        self.assertEqual((found.customer.limits, found.allowed_networks),
                         (CAPPED, (ipaddress.ip_network("198.51.100.0/24"),)))
        self.assertIsInstance(found.customer.limits.burst, int)
        left_out = parse_answer(200, json.dumps(VALID).encode(), "a@example.com")
        assert left_out is not None
        self.assertEqual((left_out.customer.limits, left_out.allowed_networks),
                         (NO_OVERRIDES, None))

    def test_a_bad_user_network_is_a_bad_answer(self) -> None:
        for networks in ["192.0.2.0/24", ["192.0.2.0/33"], [24], None]:
            with self.assertRaises(DirectoryError) as caught:
                parse_answer(200, json.dumps({**VALID, "allowed_networks": networks}).encode(),
                             "a@example.com")
            self.assertIn("allowed_networks", str(caught.exception))


def relay_accepts(doc: Any, asked: str = "a@example.com") -> bool:
    try:
        parse_answer(200, json.dumps(doc).encode(), asked)
    except DirectoryError:
        return False
    return True


def networks_in_words(doc: Any) -> bool:
    """The rule ``Networks`` states in words only: each string is a network
    in CIDR notation (a bare address its /32 or /128, host bits ignored)."""
    holders = [doc, doc.get("customer")] if isinstance(doc, dict) else []
    for holder in holders:
        value = holder.get("allowed_networks") if isinstance(holder, dict) else None
        for item in value if isinstance(value, list) else []:
            if isinstance(item, str):
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    return False
    return True


class SchemaAgrees(unittest.SynchronousTestCase):
    """The relay reads exactly the answers docs/delivery-api.yaml's
    ``SMTPUser`` allows, property by property, on both sides of each bound."""

    def setUp(self) -> None:
        self.spec = Spec()
        self.schema = self.spec.validator("/components/schemas/SMTPUser")
        self.assertTrue(self.schema.is_valid(VALID))
        self.assertTrue(relay_accepts(VALID))

    def agree(self, doc: Any, asked: str = "a@example.com") -> None:
        expected = self.schema.is_valid(doc) and networks_in_words(doc)
        self.assertEqual(relay_accepts(doc, asked), expected, doc)

    def test_customer_space(self) -> None:
        schema = self.spec.resolve(self.spec.doc["components"]["schemas"]["CustomerSpace"])
        for name, prop in schema["properties"].items():
            prop = {k: v for k, v in prop.items() if k != "description"}
            for value in probes(self.spec, prop):
                self.agree({**VALID, "customer": {**VALID["customer"], name: value}})  # type: ignore[dict-item]
            self.agree({**VALID, "customer": {k: v for k, v in VALID["customer"].items()  # type: ignore[attr-defined]
                                              if k != name}})
        for value in probes(self.spec, {"type": "integer", "minimum": 0, "maximum": 15}):
            self.agree({**VALID, "customer": {**VALID["customer"], "from_flags": {"a@b": value}}})  # type: ignore[dict-item]
        self.agree({**VALID, "customer": {**VALID["customer"], "later": [1]}})  # type: ignore[dict-item]

    def test_user(self) -> None:
        for value in probes(self.spec, {"type": "string", "minLength": 1}):
            asked = value if isinstance(value, str) and value else "a@example.com"
            self.agree({**VALID, "email": value}, asked)
        for value in [None, 1, [], VALID["password_hash"], php_hash("x")]:
            self.agree({**VALID, "password_hash": value})
        for key in VALID:
            self.agree({k: v for k, v in VALID.items() if k != key})
        self.agree({**VALID, "later_field": {"x": 1}})
        schema = self.spec.resolve(self.spec.doc["components"]["schemas"]["SMTPUser"])
        for name, prop in schema["properties"].items():
            if name in VALID:
                continue  # probed above, and in test_customer_space
            prop = {k: v for k, v in prop.items() if k != "description"}
            for value in probes(self.spec, prop):
                self.agree({**VALID, name: value})
        # Rules the schema states in words: the address asked, a known format.
        self.assertFalse(relay_accepts(VALID, "b@example.com"))
        self.assertFalse(relay_accepts({**VALID, "password_hash": "plain"}))

    def test_networks_in_words(self) -> None:
        """``Networks``' CIDR syntax, stated in words: the schema takes any
        string, the relay a network only, for the space and the user."""
        good = [[], ["192.0.2.0/24", "2001:db8::/32"], ["192.0.2.1"], ["2001:db8::1"],
                ["192.0.2.1/24"], ["0.0.0.0/0", "::/0"]]
        bad = [["x"], [""], ["192.0.2.0/33"], ["2001:db8::/129"], ["300.0.0.0/8"],
               ["192.0.2.0/24", "192.0.2.0/24/8"], ["example.com"], ["192.0.2.0/-1"]]
        for networks in good + bad:
            for doc in [{**VALID, "allowed_networks": networks},
                        {**VALID, "customer": {**VALID["customer"],  # type: ignore[dict-item]
                                               "allowed_networks": networks}}]:
                self.assertTrue(self.schema.is_valid(doc), doc)
                self.assertEqual(relay_accepts(doc), networks in good, doc)
