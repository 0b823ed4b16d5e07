"""A burst of connections: every listener gets a real listen backlog.

With Twisted's default of 50, a burst of 1,000 clients overflows the
accept queue; the kernel drops the SYNs of the rest, which retry after
1 s, 3 s, 7 s...  The relay, built the way the twistd plugin builds it
with ``workers = 1``, must greet all of them promptly.

The clients run in a child process (plain non-blocking sockets and a
selector), so they do not compete with the reactor for the interpreter.
``MXMRELAY_BURST_ENDPOINT`` replaces the listener's endpoint string (for
example ``tcp:0:interface=127.0.0.1:backlog=50`` shows the old failure).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mxmrelay.config import Config
from mxmrelay.service import make_service
from tests.support import API, config_dict, directory

CLIENTS = 1000
#: All greeted within this (about 0.3 s is typical; with a backlog of 50
#: a third of them have no greeting after 5 s).
DEADLINE = 3.0

_CLIENT = r"""
import json, resource, selectors, socket, sys, time
port, count, deadline = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < count + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 64), hard))
sel = selectors.DefaultSelector()
socks, data, greeted, errors = [], {}, {}, 0
start = time.monotonic()
for i in range(count):
    s = socket.socket()
    # From 50 loopback addresses: the per-address limit is not the subject.
    s.bind((f"127.0.1.{1 + i % 50}", 0))
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    socks.append(s)
    data[s] = b""
    sel.register(s, selectors.EVENT_READ)
while len(greeted) + errors < count and time.monotonic() - start < deadline:
    for key, _ in sel.select(timeout=0.05):
        s = key.fileobj
        try:
            chunk = s.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            errors += 1
            sel.unregister(s)
            continue
        data[s] += chunk
        if b"\r\n" in data[s]:
            greeted[s] = time.monotonic() - start
            sel.unregister(s)
ok = sum(1 for s in greeted if data[s].startswith(b"220 "))
print(json.dumps({"greeted": ok, "errors": errors,
                  "last": max(greeted.values(), default=None)}))
for s in socks:
    s.close()
"""


def _raise_nofile(testcase: unittest.TestCase, need: int) -> None:
    """This process accepts ``need`` connections at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise unittest.SkipTest(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    testcase.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 4096


class Burst(unittest.TestCase):
    timeout = 60

    async def test_thousand_clients_greeted(self) -> None:
        if _somaxconn() < CLIENTS:
            # The kernel caps every backlog at somaxconn (4096 by default
            # since Linux 5.4; 128 before).
            raise unittest.SkipTest(f"net.core.somaxconn is {_somaxconn()} < {CLIENTS}")
        _raise_nofile(self, 2 * CLIENTS + 256)
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        api = API(self, folder)
        endpoint = os.environ.get("MXMRELAY_BURST_ENDPOINT", "tcp:0:interface=127.0.0.1")
        data = config_dict(folder, api.url,
                           listener=[{"role": "submission", "endpoint": endpoint}])
        config = Config.from_dict(data, folder, "test config")
        self.assertEqual(config.workers, 1)
        top = make_service(config, reactor, directory())
        top.startService()
        self.addCleanup(top.stopService)
        [listener] = [s for s in top if isinstance(s, StreamServerEndpointService)]
        waiting: Any = listener._waitingForPort
        port = (await waiting).getHost().port

        def burst() -> dict[str, Any]:
            done = subprocess.run(
                [sys.executable, "-c", _CLIENT, str(port), str(CLIENTS), str(DEADLINE + 5)],
                capture_output=True, text=True, timeout=60, check=True)
            result: dict[str, Any] = json.loads(done.stdout)
            return result

        result = await deferToThread(burst)
        sys.stderr.write(f"\n{endpoint}: {result}\n")
        self.assertEqual(result["greeted"], CLIENTS, result)
        self.assertLess(result["last"], DEADLINE, result)


class Descriptions(unittest.SynchronousTestCase):
    def test_backlog_added_unless_given(self) -> None:
        from mxmrelay.endpoints import LISTEN_BACKLOG, with_backlog

        self.assertEqual(LISTEN_BACKLOG, 1024)
        cases = {
            "tcp:587": "tcp:587:backlog=1024",
            "tcp:587:interface=127.0.0.1": "tcp:587:interface=127.0.0.1:backlog=1024",
            "tcp6:587:interface=\\:\\:1": "tcp6:587:interface=\\:\\:1:backlog=1024",
            "haproxy:tcp:587": "haproxy:tcp:587:backlog=1024",
            "haproxy:tcp6:587": "haproxy:tcp6:587:backlog=1024",
            "tcp:587:backlog=10": "tcp:587:backlog=10",
            "haproxy:tcp:587:backlog=10": "haproxy:tcp:587:backlog=10",
            "systemd:domain=INET6:index=0": "systemd:domain=INET6:index=0",
            "haproxy:systemd:domain=INET6:index=0": "haproxy:systemd:domain=INET6:index=0",
            "unix:/run/mxmrelay.sock": "unix:/run/mxmrelay.sock",
        }
        for given_, expected in cases.items():
            self.assertEqual(with_backlog(given_), expected)

    def test_endpoints_still_parse(self) -> None:
        from twisted.internet.endpoints import serverFromString

        from mxmrelay.endpoints import with_backlog

        for description in ("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1",
                            "haproxy:tcp:0:interface=127.0.0.1"):
            endpoint: Any = serverFromString(reactor, with_backlog(description))
            inner = getattr(endpoint, "_wrappedEndpoint", endpoint)
            self.assertEqual(inner._backlog, 1024, description)
        endpoint = serverFromString(reactor, with_backlog("tcp:0:backlog=7"))
        self.assertEqual(endpoint._backlog, 7)

    def test_workers_bind_with_the_same_backlog(self) -> None:
        """``workers = N`` binds its own sockets: the same default, and
        ``backlog=`` still wins (the kernel's view, through ss)."""
        import shutil

        from mxmrelay.config import Listener
        from mxmrelay.workers import bind

        if shutil.which("ss") is None:
            raise unittest.SkipTest("needs ss (iproute2)")
        for endpoint, expected in (("tcp:0:interface=127.0.0.1", 1024),
                                   ("haproxy:tcp:0:interface=127.0.0.1:backlog=77", 77)):
            sock, _ = bind(Listener("submission", endpoint))
            self.addCleanup(sock.close)
            port = sock.getsockname()[1]
            out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                 text=True, check=True).stdout.split()
            # State Recv-Q Send-Q ...: for a listener, Send-Q is the backlog.
            self.assertEqual(int(out[2]), expected, (endpoint, out))
