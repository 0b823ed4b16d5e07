"""The platform directory's cache: fresh answers, shared requests, stale
answers while the platform fails.  Pure (a clock and Deferreds), so every
timing rule is tested on a :class:`~twisted.internet.task.Clock`.

- A found user is reused for ``ttl`` seconds, an unknown address for
  ``negative_ttl`` seconds (counted from the platform's answer).
- Concurrent lookups of one address share one request: the first starts
  it, the others wait for its answer.
- When a request fails, a user the platform found less than ``stale_ttl``
  seconds ago is answered from the cache (a platform outage must not stop
  customers that were sending a minute ago).  An unknown address, or a
  user answered longer ago, gets the failure: a 454, never a 535.
- At most ``max_entries`` addresses are kept, the least recently used
  dropped first.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mxmrelay import metrics
from mxmrelay.directory import User

__all__ = ["DirectoryCache"]

log = Logger(namespace="mxmrelay.directory")


@attrs.frozen
class _Entry:
    user: User | None
    #: When the platform gave this answer.
    answered: float


@attrs.define
class DirectoryCache:
    """Answers of the platform directory, by lower-cased address."""

    clock: IReactorTime
    ttl: float
    negative_ttl: float
    stale_ttl: float
    max_entries: int = 100_000
    #: Lookups by how they were answered: ``fresh`` (from the cache),
    #: ``asked`` (the platform answered), ``shared`` (joined a request in
    #: flight), ``stale`` (the platform failed, the cache answered) and
    #: ``failed``.
    counts: Counter[str] = attrs.field(factory=Counter)
    _entries: OrderedDict[str, _Entry] = attrs.field(factory=OrderedDict)
    _flying: dict[str, list[Deferred[User | None]]] = attrs.field(factory=dict)

    def lookup(self, key: str, fetch: Callable[[], Deferred[User | None]]
               ) -> Deferred[User | None]:
        """The answer for ``key``: from the cache while fresh, else from
        ``fetch()`` (at most one call in flight per key)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            limit = self.ttl if entry.user is not None else self.negative_ttl
            if self.clock.seconds() - entry.answered < limit:
                self.counts["fresh"] += 1
                metrics.directory_cache("hit" if entry.user is not None else "negative_hit")
                return succeed(entry.user)
        # Each caller gets a Deferred of its own, so that one that gives
        # up (cancels) does not take the answer from the others.
        mine: Deferred[User | None] = Deferred()
        waiting = self._flying.get(key)
        if waiting is not None:
            self.counts["shared"] += 1
            metrics.directory_cache("shared")
            waiting.append(mine)
            return mine
        self._flying[key] = [mine]
        metrics.directory_cache("miss")
        fetch().addCallbacks(self._answered, self._failed, callbackArgs=(key,),
                             errbackArgs=(key,))
        return mine

    def _answered(self, user: User | None, key: str) -> None:
        self.counts["asked"] += 1
        self._entries.pop(key, None)
        self._entries[key] = _Entry(user, self.clock.seconds())
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        for d in self._flying.pop(key, []):
            d.callback(user)

    def _failed(self, failure: Failure, key: str) -> None:
        waiting = self._flying.pop(key, [])
        entry = self._entries.get(key)
        if entry is not None and entry.user is not None:
            age = self.clock.seconds() - entry.answered
            if age < self.stale_ttl:
                self.counts["stale"] += 1
                metrics.directory_cache("stale")
                log.warn("directory unavailable: user={user} answered from the cache, "
                         "{age:.0f} s old", user=entry.user.email, age=age)
                for d in waiting:
                    d.callback(entry.user)
                return
        self.counts["failed"] += 1
        metrics.directory_cache("failed")
        for d in waiting:
            d.errback(failure)
