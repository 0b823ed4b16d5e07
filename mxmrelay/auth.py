"""Customer authentication: password hashes, the cred checker, SASL, limits.

Passwords are stored only as hashes (scrypt, bcrypt or argon2id: see
:mod:`mxmrelay.hashes`) and checked on a thread so that a 40 ms hash never
stalls the reactor.  An
unknown user is checked against a dummy hash, so the reply time does not
tell an attacker which addresses exist.
"""

from __future__ import annotations

import binascii
import hmac
import os
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from mxmrelay import hashes, metrics
from mxmrelay.directory import IDirectory, User
from mxmrelay.hashes import hash_password as hash_password  # mxmrelay-passwd's
from mxmrelay.reply import Reply


def verify_password(password: str, encoded: str) -> bool:
    """Check ``password`` against an encoded hash (any format
    :mod:`mxmrelay.hashes` knows); an unknown format is a mismatch."""
    try:
        return hashes.verify(password, encoded)
    except hashes.InvalidHash:
        return False


@implementer(ICredentialsChecker)
@attrs.define
class DirectoryChecker:
    """Checks username/password against the customer directory.

    The avatar id it returns is the :class:`~mxmrelay.directory.User`
    itself, so that the realm need not look the user up a second time.
    """

    directory: IDirectory
    #: How password checks are run; a thread by default, inline in tests
    #: that want no threads.
    run: Callable[..., Deferred[Any]] = deferToThread
    #: Remembers recent successful checks (see :class:`CredentialCache`).
    cache: CredentialCache | None = None
    #: What an unknown user's password is checked against.
    dummy: hashes.DummyHash = attrs.field(factory=hashes.DummyHash)
    credentialInterfaces = (IUsernamePassword,)

    async def _check(self, credentials: Any) -> User:
        username = credentials.username
        password = credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8")
        if isinstance(password, bytes):
            password = password.decode("utf-8")
        try:
            user = await self.directory.find_user(username)
        except Exception:
            metrics.directory_lookup("error")
            raise
        metrics.directory_lookup("not_found" if user is None else "found")
        encoded = user.password_hash if user is not None else None
        if user is not None and self.cache is not None and self.cache.hit(user, password):
            return user
        ok = await self.run(_verify_or_dummy, password, encoded, self.dummy)
        if user is None or not ok:
            raise UnauthorizedLogin("Authentication credentials invalid")
        if self.cache is not None:
            self.cache.remember(user, password)
        return user

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(credentials))


@attrs.define
class CredentialCache:
    """Recent successful logins, so that a client that connects for every
    message (PHPMailer, .NET, cron scripts) does not cost a 40 ms scrypt
    each time: the same idea as Dovecot's auth cache.

    It keeps a keyed hash (HMAC-SHA256 with a key made at start and never
    stored) of user, stored hash and password, for ``ttl`` seconds.  Only
    successes are cached: a wrong password always costs the full scrypt
    check, so guessing is no faster.  The rule, whatever the directory
    backend: an entry counts only while the user record the directory
    gives *now* carries the same password hash (the checker looks the user
    up before asking the cache, and the hash is part of the keyed hash),
    so a changed hash misses and a removed user is never looked at.
    Bounded: the oldest entries are dropped first.
    """

    clock: IReactorTime
    ttl: float
    max_entries: int = 100_000
    _key: bytes = attrs.field(factory=lambda: os.urandom(32))
    _entries: OrderedDict[str, tuple[bytes, float]] = attrs.field(factory=OrderedDict)

    def _mac(self, user: User, password: str) -> bytes:
        data = "\0".join((user.email.lower(), user.password_hash, password))
        return hmac.digest(self._key, data.encode("utf-8", "surrogatepass"), "sha256")

    def hit(self, user: User, password: str) -> bool:
        entry = self._entries.get(user.email.lower())
        if entry is None:
            return False
        mac, expires = entry
        if expires <= self.clock.seconds():
            del self._entries[user.email.lower()]
            return False
        return hmac.compare_digest(mac, self._mac(user, password))

    def remember(self, user: User, password: str) -> None:
        if self.ttl <= 0:
            return
        key = user.email.lower()
        self._entries.pop(key, None)
        self._entries[key] = (self._mac(user, password), self.clock.seconds() + self.ttl)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every login (on a reload: the hash rule alone already
        refuses a changed password; this also drops removed users' entries)."""
        self._entries.clear()


def _verify_or_dummy(password: str, encoded: str | None, dummy: hashes.DummyHash) -> bool:
    """Check a known user's hash, or the dummy for an unknown one (both
    directory backends check every hash's format as they read it)."""
    if encoded is None:
        hashes.verify(password, dummy.encoded())
        return False
    try:
        hashes.check(encoded)
    except hashes.InvalidHash:
        # A malformed hash in the directory file: no password matches it.
        hashes.verify(password, dummy.encoded())
        return False
    dummy.learn(encoded)
    return hashes.verify(password, encoded)


def decode_response(line: bytes) -> bytes:
    """Strictly decode one base64 SASL response line (``=`` is empty).

    These SASL helpers raise the :class:`~mxmrelay.reply.Reply` a malformed
    exchange gets, so the session answers with it as it is."""
    line = line.strip()
    if line == b"*":
        raise Reply(501, "5.7.0", "Authentication aborted")
    if line == b"=":
        return b""
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except (binascii.Error, ValueError):
        raise Reply(501, "5.5.2", "Cannot decode response") from None


def parse_plain(response: bytes) -> tuple[str, str]:
    """Split a PLAIN response (RFC 4616) into username and password.

    An authorization identity other than the user itself is refused:
    nobody may act as another user by naming them.
    """
    parts = response.split(b"\0")
    if len(parts) != 3:
        raise Reply(501, "5.5.2", "Cannot decode response")
    authzid, authcid, passwd = (_utf8(p) for p in parts)
    if not authcid or not authcid.isprintable() or not authzid.isprintable():
        raise Reply(501, "5.5.2", "Cannot decode response")
    if authzid and authzid.lower() != authcid.lower():
        raise Reply(535, "5.7.8", "Authentication credentials invalid")
    return authcid, passwd


def decode_text(response: bytes, *, name: bool = False) -> str:
    """A LOGIN response as text; a user ``name`` must be printable (no
    line breaks to smuggle into logs or the workers' control channel)."""
    text = _utf8(response)
    if name and not (text and text.isprintable()):
        raise Reply(501, "5.5.2", "Cannot decode response")
    return text


def _utf8(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise Reply(501, "5.5.2", "Cannot decode response") from None


@attrs.define
class FailureLimiter:
    """Counts AUTH failures per key (client address, user) in a window.

    Shared by every connection of a process, so that an attacker who
    reconnects after each 421 still meets the limit.  The table is bounded:
    the oldest keys are forgotten first.  With several worker processes,
    each failure is also reported through ``on_record`` to the supervisor,
    which keeps the one shared count and sends every worker a ``block``.
    """

    clock: IReactorTime
    limit: int
    window: float
    max_keys: int = 100_000
    on_record: Callable[[str], None] | None = None
    _seen: OrderedDict[str, deque[float]] = attrs.field(factory=OrderedDict)
    _blocks: dict[str, float] = attrs.field(factory=dict)

    def _recent(self, key: str) -> deque[float] | None:
        times = self._seen.get(key)
        if times is None:
            return None
        horizon = self.clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._seen[key]
            return None
        return times

    def blocked(self, key: str) -> bool:
        until = self._blocks.get(key)
        if until is not None:
            if until > self.clock.seconds():
                return True
            del self._blocks[key]
        times = self._recent(key)
        return times is not None and len(times) >= self.limit

    def record(self, key: str) -> float | None:
        """Count a failure; return until when ``key`` is now blocked, if it is."""
        times = self._recent(key)
        if times is None:
            times = self._seen[key] = deque(maxlen=self.limit)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
        times.append(self.clock.seconds())
        if self.on_record is not None:
            self.on_record(key)
        if len(times) >= self.limit:
            return times[0] + self.window
        return None

    def block(self, key: str, until: float) -> None:
        """Block ``key`` until a time (a block decided by the supervisor)."""
        if len(self._blocks) >= self.max_keys:
            now = self.clock.seconds()
            self._blocks = {k: t for k, t in self._blocks.items() if t > now}
            if len(self._blocks) >= self.max_keys:
                return
        self._blocks[key] = until
