"""``twistd -n mxmrelay-refapi --config FILE``: the reference API's own process.

Its start-up errors are one line each and exit status 1, as the relay's are.
"""

from __future__ import annotations

import socket

from twisted.trial import unittest

from tests.helpers import TWISTD, folder_for, free_ports, write
from tests.process_support import Twistd, refapi_config
from tests.support import fetch_json


class RefAPIProcess(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        if not TWISTD.exists():
            raise unittest.SkipTest(f"{TWISTD} is missing")

    async def test_serves_and_stops(self) -> None:
        folder = folder_for(self)
        port, = free_ports(1)
        proc = Twistd(self, write(folder, "refapi.toml", refapi_config(folder, port)),
                      plugin="mxmrelay-refapi")
        await proc.listening(port)
        self.assertEqual(await fetch_json(f"http://127.0.0.1:{port}/v1/sends"),
                         {"sends": [], "next": None, "prev": None})
        await proc.stop(self)
        self.assertTrue((folder / "refapi.sqlite3").exists())

    async def test_startup_errors(self) -> None:
        folder = folder_for(self)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        good = refapi_config(folder, 0)
        cases = [
            ({**good, "tokn": "x"}, ["tokn: unknown key (did you mean 'token'?)"]),
            ({"endpoint": good["endpoint"], "database": good["database"]},
             ["token: missing or not a non-empty string"]),
            ({**good, "endpoint": "tcpx:80"}, ["endpoint: 'tcpx:80'"]),
            ({**good, "endpoint": f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"},
             ["endpoint: address already in use"]),
        ]
        procs = []
        for i, (data, expected) in enumerate(cases):
            config = write(folder / str(i), "refapi.toml", data)
            procs.append((Twistd(self, config, plugin="mxmrelay-refapi"), config, expected))
        for proc, config, expected in procs:
            self.assertEqual(await proc.exit(timeout=15), 1, proc.text)
            lines = [x for x in proc.text.splitlines() if "cannot start" in x]
            self.assertEqual(len(lines), 1, proc.text)
            self.assertTrue(lines[0].startswith(f"mxmrelay-refapi: cannot start: {config}: "),
                            proc.text)
            for words in expected:
                self.assertIn(words, lines[0])
            self.assertNotIn("Traceback", proc.text)
