"""``twistd -n mxmrelay`` as a separate process: start, a send, SIGTERM,
beside ``twistd -n mxmrelay-refapi`` (the reference API's own process);
systemd socket activation with the production example's endpoints;
start-up errors.

Child Python processes get ``PYTHONPATH`` = the project, so they run the
code under test rather than whatever was last installed into the venv.
"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest

from tests.helpers import ETC, TWISTD, folder_for, free_ports, write
from tests.process_support import (
    ROLE_PORTS,
    TOKEN,
    Twistd,
    banned_hosts,
    base_config,
    refapi_config,
    refapi_process,
    relay_config,
    smtp_send,
    smtp_wrong_password,
    unit_settings,
)
from tests.support import fetch_json, in_thread


class Process(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        if not TWISTD.exists():
            raise unittest.SkipTest(f"{TWISTD} is missing")

    async def test_relay_and_api(self) -> None:
        folder = folder_for(self)
        smtp, submission, smtps, api = free_ports(4)
        api_proc = await refapi_process(self, folder, api)
        data = relay_config(folder, {"smtp": smtp, "submission": submission, "smtps": smtps},
                            f"http://127.0.0.1:{api}/v1/sends")
        proc = Twistd(self, write(folder, "relay.toml", data))
        await proc.listening(submission)
        ca = Path(data["tls"]["certificate"])

        code, text = await in_thread(smtp_send, "127.0.0.1", submission, ca, "one process")
        self.assertEqual(code, 250, text)
        send_id = text.split()[-1]
        self.assertEqual(await in_thread(smtp_wrong_password, submission, ca), 535)

        listed = await fetch_json(f"http://127.0.0.1:{api}/v1/sends")
        stored = {s["id"]: s for s in listed["sends"]}
        self.assertIn(send_id, stored)
        self.assertEqual(stored[send_id]["client"]["listener"], "submission")
        self.assertEqual(stored[send_id]["tags"], ["process"])

        await proc.stop(self)
        self.assertIn("connect client=127.0.0.1 listener=submission", proc.text)
        self.assertIn("auth ok client=127.0.0.1 user=demo@example.com", proc.text)
        # The fail2ban filter finds the failed AUTH (smtplib tries two
        # mechanisms: two failures) in twistd's real output.
        self.assertEqual(banned_hosts(proc.text),
                         ["127.0.0.1"] * proc.text.count("] auth failure rhost="))
        self.assertTrue(banned_hosts(proc.text))
        await api_proc.stop(self)

    async def test_relay_and_api_started_together(self) -> None:
        """As `make run` starts them: neither waits for the other."""
        folder = folder_for(self)
        smtps, api = free_ports(2)
        api_proc = Twistd(self, write(folder / "api", "api.toml", refapi_config(folder, api)),
                          plugin="mxmrelay-refapi")
        relay = relay_config(folder, {"smtps": smtps}, f"http://127.0.0.1:{api}/v1/sends")
        relay_proc = Twistd(self, write(folder / "relay", "relay.toml", relay))
        await gatherResults([Deferred.fromCoroutine(api_proc.listening(api)),
                             Deferred.fromCoroutine(relay_proc.listening(smtps))])
        self.assertNotIn("SMTPFactory", api_proc.text)  # no listeners there

        ca = Path(relay["tls"]["certificate"])
        code, text = await in_thread(smtp_send, "127.0.0.1", smtps, ca, "two processes", True)
        self.assertEqual(code, 250, text)
        send_id = text.split()[-1]
        stored = await fetch_json(f"http://127.0.0.1:{api}/v1/sends/{send_id}")
        self.assertEqual(stored["client"]["listener"], "smtps")
        self.assertIn('"POST /v1/sends HTTP/1.1" 201', api_proc.text)

        await relay_proc.stop(self)
        await api_proc.stop(self)

    async def test_socket_activation_with_the_production_endpoints(self) -> None:
        await self.socket_activation(workers=1)

    async def test_socket_activation_with_workers(self) -> None:
        await self.socket_activation(workers=2)

    async def socket_activation(self, workers: int) -> None:
        """The production example's [[listener]] endpoints, verbatim, on
        sockets made as mxmrelay.socket makes them (dual-stack IPv6, passed
        in ListenStream= order)."""
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.close()
        except OSError:
            raise unittest.SkipTest("no IPv6 sockets here") from None
        listen_ports = [int(p) for p in unit_settings(ETC / "mxmrelay.socket")["ListenStream"]]
        example = tomllib.loads((ETC / "mxmrelay.toml").read_text())
        sockets = []
        for _ in listen_ports:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # BindIPv6Only=both
            s.bind(("::", 0))
            s.listen(16)
            sockets.append(s)
        for s in sockets:
            self.addCleanup(s.close)
        # socket i stands for ListenStream=listen_ports[i]
        port_of = {ROLE_PORTS[p]: s.getsockname()[1] for p, s in zip(listen_ports, sockets,
                                                                    strict=True)}

        folder = folder_for(self)
        api_port, = free_ports(1)
        data = base_config(folder)
        data["listener"] = example["listener"]
        data["delivery_api"] = {"url": f"http://127.0.0.1:{api_port}/v1/sends", "token": TOKEN}
        api = await refapi_process(self, folder, api_port)
        data["workers"] = workers
        proc = Twistd(self, write(folder, "relay.toml", data), sockets=sockets)
        for s in sockets:
            s.close()  # the child has them now
        await proc.listening(port_of["submission"], greeting=True)
        ca = Path(data["tls"]["certificate"])

        for role, port in port_of.items():
            code, text = await in_thread(smtp_send, "127.0.0.1", port, ca, f"activated {role}",
                                         role == "smtps")
            self.assertEqual(code, 250, text)
            stored = await fetch_json(f"http://127.0.0.1:{api_port}/v1/sends/{text.split()[-1]}")
            self.assertEqual(stored["client"]["listener"], role)
            # The client's real address, as an IPv4-mapped IPv6 address:
            # domain=INET on these sockets would read garbage here.
            self.assertEqual(stored["client"]["address"], "::ffff:127.0.0.1")
        await proc.stop(self)
        await api.stop(self)

    async def test_startup_errors(self) -> None:
        """Each mistake: exit 1 within seconds, one line naming the file and
        the key, no traceback, and no hang."""
        folder = folder_for(self)
        good = relay_config(folder, {"submission": 0}, "http://127.0.0.1:9/v1/sends")
        cases: list[tuple[Path, list[str]]] = []

        missing_cert = {**good, "tls": {**good["tls"],
                                        "certificate": str(folder / "no-such-cert.pem")}}
        cases.append((write(folder / "cert", "relay.toml", missing_cert),
                      [str(folder / "no-such-cert.pem"), "cannot read certificate"]))

        directory = write(folder / "dir", "directory.toml", {
            "customer": [{"id": "demo", "domains": ["example.com"]}],
            "user": [{"email": "a@example.com", "password": "scrypt$x", "customer": "nobody"}],
        })
        cases.append((write(folder / "dir", "relay.toml", {**good, "directory": str(directory)}),
                      [str(directory), "user[0].customer"]))

        bad_toml = folder / "toml" / "relay.toml"
        bad_toml.parent.mkdir()
        bad_toml.write_text('hostname = "relay.test"\n[tls\n')
        cases.append((bad_toml, [str(bad_toml), "not valid TOML"]))

        endpoint = {**good, "listener": [{"role": "submission", "endpoint": "tcpx:25"}]}
        cases.append((write(folder / "endpoint", "relay.toml", endpoint),
                      ["listener[0].endpoint", "tcpx"]))

        activated = {**good, "listener": [{"role": "submission",
                                           "endpoint": "systemd:domain=INET6:index=0"}]}
        cases.append((write(folder / "systemd", "relay.toml", activated),
                      ["listener[0].endpoint", "no such socket passed by systemd"]))

        # workers: the supervisor binds as it is built; a port in use must
        # still end the process.
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        supervised = {**good, "workers": 2, "listener": [{
            "role": "submission",
            "endpoint": f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"}]}
        cases.append((write(folder / "workers", "relay.toml", supervised),
                      ["Address already in use"]))

        procs = [(Twistd(self, config), expected) for config, expected in cases]
        for proc, expected in procs:
            self.assertEqual(await proc.exit(timeout=15), 1, proc.text)
            self.assertIn("mxmrelay: cannot start: ", proc.text)
            for words in expected:
                self.assertIn(words, proc.text)
            self.assertNotIn("Traceback", proc.text)
