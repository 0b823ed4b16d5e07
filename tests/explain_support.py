"""A relay for the explain, sandbox and refusal tests: the test harness's
relay (tests/support.py), with a directory that also holds a sandbox user
and a space with ``explain = false``, and its refusal reports going to the
reference API as in production."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mxmrelay.auth import hash_password
from mxmrelay.config import Config
from mxmrelay.directory import TomlDirectory
from mxmrelay.forwarder import Forwarder
from mxmrelay.refusals import RefusalPoster, RefusalQueue, refusals_url
from mxmrelay.service import Relay
from tests.helpers import listen
from tests.support import API, PASSWORDS, RelayUnderTest, config_dict, fetch_json

SANDBOX = ("try@example.com", "sandbox-password")
QUIET = ("quiet@quiet.test", "quiet-password")
_HASH = {email: hash_password(pw, n=2**10) for email, pw in
         [*PASSWORDS.items(), SANDBOX, QUIET]}


def directory() -> TomlDirectory:
    return TomlDirectory.from_dict({
        "customer": [
            {"id": "demo", "name": "Demo", "domains": ["example.com"], "flags": 1},
            {"id": "quiet", "name": "Quiet", "domains": ["quiet.test"], "explain": False},
        ],
        "user": [
            {"email": "demo@example.com", "password": _HASH["demo@example.com"],
             "customer": "demo"},
            {"email": SANDBOX[0], "password": _HASH[SANDBOX[0]], "customer": "demo",
             "sandbox": True},
            {"email": QUIET[0], "password": _HASH[QUIET[0]], "customer": "quiet"},
        ],
    }, "explain test directory")


class ExplainRelay(RelayUnderTest):
    """All three roles on loopback, the reference API, refusal reports on."""

    def __init__(self, testcase: unittest.TestCase, **overrides: Any) -> None:
        folder = Path(testcase.mktemp()).resolve()
        folder.mkdir(parents=True)
        self.api: API | None = API(testcase, folder)
        assert self.api is not None
        self.config = Config.from_dict(config_dict(folder, self.api.url, **overrides), folder,
                                       "test config")
        self.ca_file = self.config.tls.certificate
        d = self.config.delivery_api
        assert d is not None
        self.forwarder = Forwarder(reactor, d.url, d.token, d.timeout)
        testcase.addCleanup(self.forwarder.close)
        url = refusals_url(d.url)
        assert url is not None
        self.poster = RefusalPoster(reactor, url, d.token, d.timeout)
        self.refusals = RefusalQueue(reactor, self.poster, interval=0.05)
        testcase.addCleanup(self.poster.close)
        testcase.addCleanup(self.refusals.stop)
        self.relay = Relay.build(self.config, reactor, self.forwarder, directory(),
                                 refusals=self.refusals)
        self.ports: dict[str, int] = {}
        for role in ("smtp", "submission", "smtps"):
            port, self.ports[role] = listen(self.relay.factory(role))
            testcase.addCleanup(port.stopListening)
        testcase.addCleanup(self._drop_connections)

    async def refusals_stored(self, n: int, query: str = "") -> list[dict[str, Any]]:
        """The refusals the API holds, once there are ``n`` (newest first)."""
        assert self.api is not None
        deadline = reactor.seconds() + 20
        while True:
            found: list[dict[str, Any]] = (
                await fetch_json(f"{self.api.base}/v1/refusals{query}"))["refusals"]
            if len(found) >= n or reactor.seconds() > deadline:
                return found
            await deferLater(reactor, 0.05, lambda: None)
