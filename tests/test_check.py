"""``mxmrelay-check``: what it says about broken configurations.

Each configuration is a real file on disk, with real certificates and a
real directory file, checked by the command's ``main()`` (and once as
``python -m mxmrelay.check``); every line must name the file and the key.
"""

from __future__ import annotations

import datetime
import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from mxmrelay import check
from tests.helpers import ROOT, toml

DIRECTORY = """\
[[customer]]
id = "demo"
domains = ["example.com"]

[[user]]
email = "demo@example.com"
password = "scrypt$n=1024,r=8,p=1$c2FsdA==$aGFzaA=="
customer = "demo"
"""


def certificate(folder: Path, days: float, name: str = "cert") -> tuple[Path, Path]:
    """A self-signed certificate valid until ``days`` from now (negative:
    already expired), and its key."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=400))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def good_config(folder: Path, days: float = 90) -> dict[str, Any]:
    """A valid relay configuration in ``folder``, with its files."""
    cert, key = certificate(folder / "tls", days)
    (folder / "directory.toml").write_text(DIRECTORY)
    return {
        "hostname": "relay.test",
        "directory": "directory.toml",
        "bounce_address": "bounce+{id}@bounces.test",
        "max_recipients": 100,
        "tls": {"certificate": str(cert), "private_key": str(key)},
        "listener": [{"role": "smtp", "endpoint": "tcp:2525:interface=127.0.0.1"},
                     {"role": "submission", "endpoint": "tcp:2587:interface=127.0.0.1"}],
        "delivery_api": {"url": "https://api.test/v1/sends", "token": "t", "timeout": 30},
        "auth": {"max_failures_per_user": 5},
    }


class CheckCommand(SynchronousTestCase):
    def folder(self) -> Path:
        p = Path(self.mktemp()).resolve()
        p.mkdir(parents=True)
        return p

    def run_check(self, folder: Path, data: dict[str, Any] | str) -> tuple[int, list[str], str]:
        """Write ``data`` as folder/relay.toml and check it: the exit code,
        the lines printed, and the file's name as the lines give it."""
        path = folder / "relay.toml"
        path.write_text(data if isinstance(data, str) else toml(data))
        out = io.StringIO()
        code = check.main(["--config", str(path)], out=out)
        return code, out.getvalue().splitlines(), str(path)

    def assertProblems(self, data: dict[str, Any], folder: Path, expected: list[str]) -> None:
        """Exit 1 and exactly the ``expected`` lines (``{file}`` stands for
        the configuration file; each may be a regular expression)."""
        code, lines, where = self.run_check(folder, data)
        self.assertEqual(code, 1, lines)
        self.assertEqual(len(lines), len(expected), lines)
        for line, pattern in zip(lines, expected, strict=True):
            pattern = pattern.replace(re.escape("{file}"), "{file}")
            self.assertRegex(line, "^" + pattern.replace("{file}", re.escape(where)) + "$")

    def test_ok(self) -> None:
        folder = self.folder()
        code, lines, _ = self.run_check(folder, good_config(folder))
        self.assertEqual((code, lines), (0, ["ok"]))

    def test_unknown_keys_with_suggestions(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        del data["max_recipients"]
        data["max_recipient"] = 5
        data["auth"] = {"max_failure_per_user": 5}
        data["tls"]["chain"] = "x.pem"
        data["colour"] = "blue"
        self.assertProblems(data, folder, [
            re.escape("{file}: max_recipient: unknown key (did you mean 'max_recipients'?)"),
            re.escape("{file}: colour: unknown key"),
            re.escape("{file}: tls.chain: unknown key"),
            re.escape("{file}: auth.max_failure_per_user: unknown key "
                      "(did you mean 'max_failures_per_user'?)"),
        ])

    def test_unknown_key_in_a_listener_and_a_misspelled_table(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        data["listener"][1]["rol"] = "smtps"
        data["delivery-api"] = data.pop("delivery_api")
        self.assertProblems(data, folder, [
            re.escape("{file}: delivery-api: unknown key (did you mean 'delivery_api'?)"),
            re.escape("{file}: listener[1].rol: unknown key (did you mean 'role'?)"),
            re.escape("{file}: delivery_api: listeners need a [delivery_api] to forward to"),
        ])

    def test_bad_types_and_limits(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        data.update(max_recipients="many", max_message_size=1023, workers=0, idle_timeout=0)
        data["delivery_api"]["timeout"] = 601
        data["auth"] = {"max_failures_per_user": 0, "cache_ttl": -1}
        data["listener"][0]["role"] = "pop3"
        self.assertProblems(data, folder, [
            re.escape("{file}: listener[0].role: must be one of smtp, submission, smtps"),
            re.escape("{file}: delivery_api.timeout: must be a number from 0.1 to 600"),
            re.escape("{file}: auth.max_failures_per_user: must be an integer of at least 1"),
            re.escape("{file}: auth.cache_ttl: must be a number of at least 0"),
            re.escape("{file}: max_message_size: must be an integer of at least 1024"),
            re.escape("{file}: max_recipients: must be an integer from 1 to 10000"),
            re.escape("{file}: idle_timeout: must be a number of at least 1"),
            re.escape('{file}: workers: must be an integer from 1 to 256, or "auto"'),
        ])

    def test_missing_certificate(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        missing = folder / "no-such-cert.pem"
        data["tls"]["certificate"] = str(missing)
        self.assertProblems(data, folder, [re.escape(
            f"{{file}}: tls.certificate: {missing}: cannot read certificate: "
            "No such file or directory")])

    def test_key_does_not_match(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        _, other = certificate(folder / "other", 90)
        data["tls"]["private_key"] = str(other)
        self.assertProblems(data, folder, [
            re.escape(f"{{file}}: tls.private_key: {other}: the key does not match the "
                      f"certificate in {data['tls']['certificate']}: ") + ".*"])

    def test_expired_certificate(self) -> None:
        folder = self.folder()
        data = good_config(folder, days=-2)
        self.assertProblems(data, folder, [re.escape(
            f"{{file}}: tls.certificate: {data['tls']['certificate']}: expired on ")
            + r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"])

    def test_certificate_expiring_soon_is_a_warning(self) -> None:
        folder = self.folder()
        data = good_config(folder, days=5.5)
        code, lines, where = self.run_check(folder, data)
        self.assertEqual(code, 0, lines)
        self.assertEqual(len(lines), 2, lines)
        self.assertRegex(lines[0], "^" + re.escape(
            f"warning: {where}: tls.certificate: {data['tls']['certificate']}: "
            "expires in 5 days, on ") + r"\d{4}-\d\d-\d\d \d\d:\d\d UTC$")
        self.assertEqual(lines[1], "ok")

    def test_bad_endpoint_strings(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        data["listener"] = [
            {"role": "smtp", "endpoint": "tcpx:25"},
            {"role": "submission", "endpoint": "tcp:port587"},
            {"role": "smtps", "endpoint": "systemd:domain=INET7:index=2"},
        ]
        self.assertProblems(data, folder, [
            re.escape("{file}: listener[0].endpoint: 'tcpx:25': ") + ".*tcpx.*",
            re.escape("{file}: listener[1].endpoint: 'tcp:port587': ") + ".+",
            re.escape("{file}: listener[2].endpoint: 'systemd:domain=INET7:index=2': "
                      "domain= must be one of INET, INET6, UNIX"),
        ])

    def test_systemd_endpoints_need_no_socket_and_nothing_is_bound(self) -> None:
        folder = self.folder()
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        data = good_config(folder)
        data["workers"] = 2
        data["listener"] = [
            {"role": "smtp", "endpoint": "systemd:domain=INET6:index=0"},
            {"role": "submission", "endpoint": "haproxy:systemd:domain=INET6:index=1"},
            # a port in use is no problem: the check binds nothing
            {"role": "smtps", "endpoint": f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"},
        ]
        code, lines, _ = self.run_check(folder, data)
        self.assertEqual((code, lines), (0, ["ok"]))
        data["listener"] = [{"role": "smtp", "endpoint": "unix:/run/relay.sock"}]
        self.assertProblems(data, folder, [re.escape(
            "{file}: listener[0].endpoint: 'unix:/run/relay.sock': with workers > 1 an endpoint "
            "must be tcp:PORT, systemd:domain=...:index=N, or either behind haproxy:")])

    def test_bad_directory_file(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        directory = folder / "directory.toml"
        directory.write_text(DIRECTORY.replace("domains =", "domain =")
                             + 'allow_subdomains = "yes"\n')
        self.assertProblems(data, folder, [
            re.escape(f"{{file}}: directory: {directory}: customer[0].domain: unknown key "
                      "(did you mean 'domains'?)"),
            re.escape(f"{{file}}: directory: {directory}: customer[0].domains: "
                      "must be a non-empty list of domain names"),
            re.escape(f"{{file}}: directory: {directory}: user[0].allow_subdomains: "
                      "unknown key"),
        ])

    def test_several_problems_at_once(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        data["max_recipent"] = 5
        data["tls"]["certificate"] = str(folder / "gone.pem")
        data["listener"][1]["endpoint"] = "tcpx:2587"
        data["directory"] = "no-directory.toml"
        data["delivery_api"]["ca_file"] = "no-ca.pem"
        code, lines, where = self.run_check(folder, data)
        self.assertEqual(code, 1)
        self.assertEqual([line.split(": ")[:2] for line in lines], [
            [where, "max_recipent"],
            [where, "listener[1].endpoint"],
            [where, "tls.certificate"],
            [where, "directory"],
            [where, "delivery_api.ca_file"],
        ], lines)
        self.assertIn(f"{folder / 'no-directory.toml'}: cannot read: No such file", lines[3])

    def test_unreadable_configuration(self) -> None:
        folder = self.folder()
        code, lines, where = self.run_check(folder, 'hostname = "x"\n[tls\n')
        self.assertEqual(code, 1)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"{where}: not valid TOML: "), lines)

    def test_production_example_passes_when_its_files_exist(self) -> None:
        """etc/mxmrelay.toml, with /etc/mxmrelay/ moved into a folder of ours."""
        folder = self.folder()
        cert, key = certificate(folder / "tls", 90)
        cert.rename(folder / "tls" / "fullchain.pem")
        key.rename(folder / "tls" / "privkey.pem")
        (folder / "directory.toml").write_text(DIRECTORY)
        text = (ROOT / "etc" / "mxmrelay.toml").read_text()
        self.assertIn('"/etc/mxmrelay/tls/fullchain.pem"', text)
        code, lines, _ = self.run_check(folder, text.replace("/etc/mxmrelay/", f"{folder}/"))
        self.assertEqual((code, lines), (0, ["ok"]))

    def test_as_a_module(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        data["max_recipient"] = 5
        path = folder / "relay.toml"
        path.write_text(toml(data))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-m", "mxmrelay.check", "--config", str(path)],
                              capture_output=True, text=True, env=env, timeout=60, check=False)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertEqual(done.stdout, f"{path}: max_recipient: unknown key "
                                      "(did you mean 'max_recipients'?)\n")
        path.write_text(toml(good_config(folder)))
        done = subprocess.run([sys.executable, "-m", "mxmrelay.check", "-c", str(path)],
                              capture_output=True, text=True, env=env, timeout=60, check=False)
        self.assertEqual((done.returncode, done.stdout), (0, "ok\n"), done.stderr)
