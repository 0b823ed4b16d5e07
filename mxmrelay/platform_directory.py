"""The customer directory from the platform's API (``[directory] url``).

The relay asks ``GET {url}/{email}`` (the address lower-cased and
percent-encoded as one path segment, with the bearer token) and reads the
answer as docs/delivery-api.yaml states (``/v1/smtp-users/{email}``):

- 200 with the user and its customer space: the user (with the space's
  sending limits and the user's ``allowed_networks``, read as the
  directory file's are);
- 404: no such user (the client gets 535 after the same work as for a
  wrong password);
- anything else (a 5xx, a 401, a redirect, a timeout, a refused connection,
  an answer that breaks the schema, a password hash in an unknown format):
  :class:`~mxmrelay.directory.DirectoryError`, which the AUTH exchange
  answers with ``454 4.7.0``, and a log line saying why.  A platform
  hiccup must never make a customer's password look wrong.

Answers are cached (see :mod:`mxmrelay.directory_cache`).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import attrs
import treq
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mxmrelay import hashes, limits_keys
from mxmrelay.config import Config, PlatformDirectoryConfig
from mxmrelay.directory import (
    CUSTOMER_KEYS,
    DirectoryError,
    IDirectory,
    InvalidDirectory,
    TomlDirectory,
    User,
    space_from_dict,
)
from mxmrelay.directory_cache import DirectoryCache
from mxmrelay.httpclient import make_client

__all__ = ["PlatformDirectory", "open_directory", "parse_answer"]

log = Logger(namespace="mxmrelay.directory")

#: The longest address looked up (RFC 5321's path limit); a longer one is
#: no user, without asking.
MAX_ADDRESS = 254
#: The largest answer read; a user and its space are a few kilobytes.
MAX_ANSWER = 1024 * 1024


class BadAnswer(DirectoryError):
    """The platform answered, but not as the contract says."""


def parse_answer(code: int, body: bytes, asked: str) -> User | None:
    """The user in the platform's answer to ``GET {url}/{asked}``, None for
    a 404, or :class:`DirectoryError` saying what was wrong."""
    if code == 404:
        return None
    if code != 200:
        if code in (401, 403):
            raise BadAnswer(f"the platform refuses the relay's token ({code}): "
                            "check directory.token")
        if 300 <= code < 400:
            raise BadAnswer(f"the platform redirects ({code}): check directory.url")
        raise DirectoryError(f"the platform answered {code}")
    try:
        data = json.loads(body)
    except ValueError:
        raise BadAnswer("the answer is not JSON") from None
    if not isinstance(data, dict):
        raise BadAnswer("the answer is not a JSON object")
    email = data.get("email")
    if not isinstance(email, str) or not email or email.lower() != asked.lower():
        raise BadAnswer("email: missing, or not the address asked for")
    encoded = data.get("password_hash")
    if not isinstance(encoded, str):
        raise BadAnswer("password_hash: missing or not a string")
    try:
        hashes.check(encoded)
    except hashes.InvalidHash as e:
        raise BadAnswer(f"password_hash: {e}") from None
    customer = data.get("customer")
    if not isinstance(customer, dict):
        raise BadAnswer("customer: missing or not an object")
    # Fields the relay does not know yet are the platform's to add.
    known = {k: v for k, v in customer.items() if k in CUSTOMER_KEYS}
    # JSON has one number type: 1.0 is the integer 1 (as JSON Schema says).
    if "flags" in known:
        known["flags"] = _integral(known["flags"])
    if isinstance(known.get("from_flags"), dict):
        known["from_flags"] = {a: _integral(v) for a, v in known["from_flags"].items()}
    try:
        space = space_from_dict(known, "answer")
    except InvalidDirectory as e:
        raise BadAnswer(str(e)) from None
    sandbox = data.get("sandbox", False)
    if not isinstance(sandbox, bool):
        raise BadAnswer("sandbox: not true or false")
    problems: list[str] = []
    networks = limits_keys.networks(data, lambda key, why: problems.append(f"{key}: {why}"))
    if problems:
        raise BadAnswer(problems[0])
    return User(email=email, password_hash=encoded, customer=space,
                allowed_networks=networks, sandbox=sandbox)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


@implementer(IDirectory)
@attrs.define
class PlatformDirectory:
    """Users looked up on the platform, through :class:`DirectoryCache`."""

    reactor: Any
    url: str
    token: str
    timeout: float
    cache: DirectoryCache
    client: HTTPClient
    pool: HTTPConnectionPool | None = None
    _headers: Headers = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._headers = Headers({b"Authorization": [b"Bearer " + self.token.encode()],
                                 b"Accept": [b"application/json"]})

    @classmethod
    def open(cls, config: PlatformDirectoryConfig, reactor: Any) -> PlatformDirectory:
        client, pool = make_client(reactor, config.ca_file, per_host=16)
        cache = DirectoryCache(reactor, config.ttl, config.negative_ttl, config.stale_ttl,
                               config.cache_entries)
        return cls(reactor, config.url, config.token, config.timeout, cache, client, pool)

    def close(self) -> Deferred[None] | None:
        if self.pool is None:
            return None
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d

    def find_user(self, email: str) -> Deferred[User | None]:
        key = email.strip().lower()
        if "@" not in key or len(key) > MAX_ADDRESS:
            return succeed(None)
        return self.cache.lookup(key, lambda: self._fetch(key))

    def _fetch(self, key: str) -> Deferred[User | None]:
        d = Deferred.fromCoroutine(self._get(key))
        d.addTimeout(self.timeout, self.reactor)
        return d.addErrback(self._failed, key)

    async def _get(self, key: str) -> User | None:
        url = EncodedURL.from_text(f"{self.url}/{quote(key, safe='@')}")
        response = await self.client.get(url, headers=self._headers, allow_redirects=False)
        length = response.length if isinstance(response.length, int) else 0
        if length > MAX_ANSWER:
            raise BadAnswer(f"the answer is over {MAX_ANSWER} bytes")
        body: bytes = await treq.content(response)
        if len(body) > MAX_ANSWER:
            raise BadAnswer(f"the answer is over {MAX_ANSWER} bytes")
        return parse_answer(response.code, body, key)

    def _failed(self, failure: Failure, key: str) -> Failure:
        """Every failure becomes a DirectoryError (a 454), with a log line."""
        if failure.check(TimeoutError, CancelledError):
            reason = f"no answer within {self.timeout} s"
        elif failure.check(ResponseFailed, ResponseNeverReceived):
            reason = "; ".join(r.getErrorMessage() for r in getattr(failure.value, "reasons", []))
        else:
            reason = failure.getErrorMessage() or type(failure.value).__name__
        if failure.check(BadAnswer):
            # The platform's answers break the contract: the operator's to fix.
            log.error("directory lookup user={user} failed: {reason}", user=key, reason=reason)
        else:
            log.warn("directory lookup user={user} failed: {reason}", user=key, reason=reason)
        if failure.check(DirectoryError):
            return failure
        return Failure(DirectoryError(reason))


def open_directory(config: Config, reactor: Any) -> tuple[IDirectory, Any]:
    """The directory ``config`` names, and what to call at stop (or None).
    A directory file is read whole here (InvalidDirectory if it is wrong)."""
    if config.platform_directory is not None:
        platform = PlatformDirectory.open(config.platform_directory, reactor)
        return platform, platform.close
    assert config.directory is not None
    return IDirectory(TomlDirectory.from_file(config.directory)), None

