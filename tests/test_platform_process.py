"""The platform directory end to end: ``twistd mxmrelay`` asks ``twistd
mxmrelay-refapi`` (which serves a directory file) over real HTTP; real
SMTP clients over real TLS on loopback."""

from __future__ import annotations

import smtplib
from pathlib import Path

from twisted.trial import unittest

from mxmrelay.hashes import hash_password
from tests.helpers import folder_for, free_ports, until, write
from tests.process_support import TOKEN, Twistd, base_config, refapi_config
from tests.support import in_thread
from tests.test_hashes import ARGON2, bcrypt_hash, php_hash


def directory_toml(users: dict[str, str]) -> str:
    lines = ['[[customer]]', 'id = "demo"', 'domains = ["example.com"]']
    for email, encoded in users.items():
        lines += ["[[user]]", f'email = "{email}"', f'password = "{encoded}"',
                  'customer = "demo"']
    return "\n".join(lines) + "\n"


def login(port: int, ca: Path, user: str, password: str, send: bool = True) -> int:
    """AUTH on submission (STARTTLS) and one send: 250 (235 without the
    send), or the AUTH reply's code."""
    import ssl

    client = smtplib.SMTP("127.0.0.1", port, timeout=15, local_hostname="client.test")
    try:
        client.starttls(context=ssl.create_default_context(cafile=str(ca)))
        try:
            client.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code
        if not send:
            return 235
        client.sendmail("app@example.com", ["someone@example.org"],
                        b"From: app@example.com\r\nTo: someone@example.org\r\n"
                        b"Subject: hi\r\n\r\nHi.\r\n")
        return 250
    finally:
        try:
            client.quit()
        except smtplib.SMTPException:
            pass


class PlatformDirectoryProcess(unittest.TestCase):
    timeout = 120

    async def test_the_whole_chain(self) -> None:
        folder = folder_for(self)
        smtp, api = free_ports(2)
        users = {"scrypt@example.com": hash_password("pw-scrypt", n=2**10),
                 "php@example.com": php_hash("pw-php"),
                 "bcrypt@example.com": bcrypt_hash("pw-bcrypt"),
                 "argon@example.com": ARGON2.hash("pw-argon")}
        dfile = write(folder, "users.toml", directory_toml(users))
        refapi = Twistd(self, write(folder / "api", "refapi.toml",
                                    {**refapi_config(folder, api), "directory": str(dfile)}),
                        plugin="mxmrelay-refapi")
        await refapi.listening(api)
        config = base_config(folder)
        config["directory"] = {"url": f"http://127.0.0.1:{api}/v1/smtp-users", "token": TOKEN,
                               "timeout": 2, "ttl": 1, "negative_ttl": 1, "stale_ttl": 600}
        config["listener"] = [{"role": "submission",
                               "endpoint": f"tcp:{smtp}:interface=127.0.0.1"}]
        config["delivery_api"] = {"url": f"http://127.0.0.1:{api}/v1/sends", "token": TOKEN,
                                  "timeout": 10}
        config["auth"] = {"cache_ttl": 300, "max_failures_per_user": 100,
                          "max_failures_per_address": 100, "max_failures_per_connection": 3}
        relay = Twistd(self, write(folder, "relay.toml", config))
        await relay.listening(smtp)
        ca = Path(config["tls"]["certificate"])

        async def code(user: str, password: str, send: bool = True) -> int:
            return await in_thread(login, smtp, ca, user, password, send)

        for email in users:
            self.assertEqual(await code(email, "pw-" + email.split("@")[0]), 250, relay.text)
        self.assertEqual(await code("scrypt@example.com", "wrong"), 535)
        self.assertEqual(await code("nobody@example.com", "pw"), 535)

        # A changed password on the platform: the old one stops within ttl,
        # even though the login cache (cache_ttl = 300) remembers it.
        users["scrypt@example.com"] = hash_password("new-pw", n=2**10)
        dfile.write_text(directory_toml(users))

        async def old_refused() -> bool:
            return await code("scrypt@example.com", "pw-scrypt") == 535

        await until(old_refused, "the old password to be refused", 10)
        self.assertEqual(await code("scrypt@example.com", "new-pw"), 250)

        # The platform goes away: known users keep sending, unknown get 454.
        await refapi.kill()
        self.assertEqual(await code("php@example.com", "pw-php", send=False), 235, relay.text)
        self.assertEqual(await code("never-seen@example.com", "x", send=False), 454)
        self.assertIn("directory lookup user=never-seen@example.com failed", relay.text)
        self.assertIn("answered from the cache", relay.text)
