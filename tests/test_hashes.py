"""Password hashes: scrypt, bcrypt ($2a$, $2b$, $2y$) and argon2id; the dummy."""

from __future__ import annotations

from collections.abc import Callable

import bcrypt
from argon2 import PasswordHasher
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial import unittest

from mxmrelay import hashes
from mxmrelay.auth import DirectoryChecker
from mxmrelay.directory import InvalidDirectory, TomlDirectory

#: Cheap costs for tests: the parameters travel in the hash.
ARGON2 = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def bcrypt_hash(password: str, prefix: bytes = b"2b") -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4, prefix)).decode()


def php_hash(password: str) -> str:
    """What PHP's password_hash(PASSWORD_BCRYPT) writes: $2y$."""
    return "$2y$" + bcrypt_hash(password)[4:]


class Formats(unittest.SynchronousTestCase):
    def test_each_format_verifies(self) -> None:
        for encoded in [hashes.hash_password("pw", n=2**10), bcrypt_hash("pw"),
                        bcrypt_hash("pw", b"2a"), php_hash("pw"), ARGON2.hash("pw")]:
            self.assertTrue(hashes.verify("pw", encoded), encoded)
            self.assertFalse(hashes.verify("pW", encoded), encoded)

    def test_bcrypt_reads_72_bytes_as_php_did(self) -> None:
        long = "x" * 80
        self.assertTrue(hashes.verify(long, php_hash(long[:72])))

    def test_unknown_formats_and_costs_are_invalid(self) -> None:
        for encoded, words in [
            ("demo-password", "unknown password hash format"),
            ("$1$abc$def", "unknown password hash format"),
            ("$argon2i$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
             "unknown password hash format"),
            ("$2b$31$" + "a" * 53, "bcrypt cost"),
            ("$2b$04$short", "not a valid bcrypt hash"),
            ("scrypt$n=1048576,r=8,p=1$c2FsdA==$" + "A" * 44, "scrypt cost"),
            ("scrypt$nope", "not a valid scrypt hash"),
            (ARGON2.hash("x").replace("m=1024", "m=4194304"), "argon2id cost"),
        ]:
            with self.assertRaises(hashes.InvalidHash) as caught:
                hashes.verify("x", encoded)
            self.assertIn(words, str(caught.exception), encoded)

    def test_file_backend_refuses_an_unknown_format_naming_the_key(self) -> None:
        with self.assertRaises(InvalidDirectory) as caught:
            TomlDirectory.from_dict({
                "customer": [{"id": "c", "domains": ["example.com"]}],
                "user": [{"email": "a@example.com", "password": "$1$md5$crypt", "customer": "c"},
                         {"email": "b@example.com", "password": php_hash("x"), "customer": "c"}],
            }, "dir.toml")
        self.assertEqual([(p.key, p.reason.split(":")[0]) for p in caught.exception.problems],
                         [("user[0].password", "unknown password hash format (known")])

    def test_dummy_has_the_format_and_cost_of_its_template(self) -> None:
        for encoded, kind in [(php_hash("x"), "$2b$04$"), (ARGON2.hash("x"),
                              "$argon2id$v=19$m=1024,t=1,p=1"),
                              (hashes.hash_password("x", n=2**10), "scrypt$n=1024,r=8,p=1")]:
            dummy = hashes.dummy_like(encoded)
            self.assertEqual(hashes.check(dummy), kind)
            self.assertIs(hashes.dummy_like(encoded), dummy)  # made once


class UnknownUserCost(unittest.TestCase):
    """An unknown user costs a check of the dummy, in the known users' format."""

    async def test_unknown_user_checks_the_dummy_of_the_last_known_format(self) -> None:
        known = ARGON2.hash("right")
        calls: list[tuple[str, str]] = []
        real = hashes.verify

        def spy(password: str, encoded: str) -> bool:
            calls.append((password, encoded))
            return real(password, encoded)

        self.patch(hashes, "verify", spy)
        users = TomlDirectory.from_dict({
            "customer": [{"id": "c", "domains": ["example.com"]}],
            "user": [{"email": "a@example.com", "password": known, "customer": "c"}],
        }, "dir.toml")

        def inline(f: Callable[..., bool], *args: object) -> Deferred[bool]:
            return maybeDeferred(f, *args)

        checker = DirectoryChecker(users, run=inline)
        await self.assertFailure(checker.requestAvatarId(
            UsernamePassword(b"nobody@example.com", b"guess")), UnauthorizedLogin)
        self.assertEqual(hashes.check(calls[-1][1]), "scrypt$n=16384,r=8,p=1")
        await checker.requestAvatarId(UsernamePassword(b"a@example.com", b"right"))
        self.assertEqual(calls[-1], ("right", known))
        await self.assertFailure(checker.requestAvatarId(
            UsernamePassword(b"nobody@example.com", b"guess")), UnauthorizedLogin)
        self.assertEqual(calls[-1][0], "guess")
        self.assertEqual(hashes.check(calls[-1][1]), "$argon2id$v=19$m=1024,t=1,p=1")
        self.assertNotEqual(calls[-1][1], known)
