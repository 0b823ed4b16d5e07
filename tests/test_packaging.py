"""What ships: the wheel, ``mxmrelay-passwd``, the production example and
the systemd units (as ``systemd-analyze verify`` sees them).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import zipfile
from pathlib import Path

from twisted.trial import unittest

from mxmrelay.auth import verify_password
from mxmrelay.config import Config
from tests.helpers import BIN, ETC, ROOT, folder_for, need, run
from tests.process_support import DEV_DIRECTORY, ROLE_PORTS, unit_settings
from tests.support import make_certificate


class Packaging(unittest.TestCase):
    timeout = 60

    async def test_wheel(self) -> None:
        """Built from a clean copy of the sources (no stale build/ folder,
        no race with other builds in the working tree)."""
        folder = folder_for(self)
        source = folder / "src"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "var", "_trial_temp*", "*.egg-info",
            "__pycache__", ".*_cache", ".hypothesis", "dropin.cache"))
        output, code = await run(BIN / "pip", "wheel", "--no-deps", "--quiet", "-w",
                                 folder / "dist", source)
        self.assertEqual(code, 0, output)
        wheels = list((folder / "dist").glob("mxmrelay-*.whl"))
        self.assertEqual(len(wheels), 1, output)
        with zipfile.ZipFile(wheels[0]) as whl:
            names = set(whl.namelist())
            entry_points = next(whl.read(n).decode() for n in names
                                if n.endswith(".dist-info/entry_points.txt"))
        self.assertIn("twisted/plugins/mxmrelay_plugin.py", names)
        self.assertIn("twisted/plugins/mxmrelay_refapi_plugin.py", names)
        self.assertIn("mxmrelay/py.typed", names)
        self.assertIn("mxmrelay_refapi/py.typed", names)
        # twisted/ and twisted/plugins/ belong to Twisted: an __init__.py of
        # ours would shadow it, or hide every other plugin.
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        # Every module of the package, and nothing else.
        for package in ("mxmrelay", "mxmrelay_refapi"):
            modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")}
            self.assertEqual({n for n in names
                              if n.startswith(f"{package}/") and n.endswith(".py")}, modules)
        self.assertIn("mxmrelay-passwd = mxmrelay.passwords:main", entry_points)

    async def test_mxmrelay_passwd(self) -> None:
        script = BIN / "mxmrelay-passwd"
        if not script.exists():
            raise unittest.SkipTest(f"{script} is missing: pip install the project")
        output, code = await run(script, stdin=b"correct horse battery\n")
        self.assertEqual(code, 0, output)
        encoded = output.strip()
        self.assertTrue(encoded.startswith("scrypt$"), output)
        self.assertTrue(verify_password("correct horse battery", encoded))
        self.assertFalse(verify_password("correct horse battery ", encoded))
        self.assertFalse(verify_password("wrong", encoded))
        # never from the command line; never empty
        _, code = await run(script, "secret")
        self.assertEqual(code, 2)
        output, code = await run(script, stdin=b"\n")
        self.assertEqual(code, 1, output)

    def test_production_example(self) -> None:
        config = Config.from_file(ETC / "mxmrelay.toml")
        assert config.delivery_api is not None
        self.assertTrue(config.delivery_api.url.startswith("https://"))
        self.assertTrue(str(config.directory).startswith("/etc/mxmrelay/"))
        self.assertTrue(str(config.tls.private_key).startswith("/etc/mxmrelay/"))
        # Each role takes the socket at the position of its port in the
        # socket unit's ListenStream= lines.
        listen = [int(p) for p in unit_settings(ETC / "mxmrelay.socket")["ListenStream"]]
        self.assertEqual(sorted(listen), sorted(ROLE_PORTS))
        self.assertEqual(sorted(x.role for x in config.listeners), sorted(ROLE_PORTS.values()))
        for listener in config.listeners:
            index = listen.index(next(p for p, r in ROLE_PORTS.items() if r == listener.role))
            # INET6: ListenStream=PORT is a dual-stack IPv6 socket.
            self.assertEqual(listener.endpoint, f"systemd:domain=INET6:index={index}")

    def test_service_unit_settings(self) -> None:
        unit = unit_settings(ETC / "mxmrelay.service")

        def one(key: str) -> str:
            self.assertEqual(len(unit.get(key, [])), 1, f"{key}: {unit.get(key)}")
            return unit[key][0]

        self.assertEqual(one("ExecStart"), "/opt/mxmrelay/venv/bin/twistd -n --pidfile= "
                         "mxmrelay --config /etc/mxmrelay/mxmrelay.toml")
        # A broken file fails the start (and systemctl restart) with the
        # reasons, before the relay is stopped for good by StartLimit*.
        self.assertEqual(one("ExecStartPre"), "/opt/mxmrelay/venv/bin/mxmrelay-check "
                         "--config /etc/mxmrelay/mxmrelay.toml")
        # The production example's listeners are systemd: endpoints.
        self.assertEqual(one("Requires"), "mxmrelay.socket")
        self.assertIn("mxmrelay.socket", " ".join(unit["After"]).split())
        self.assertEqual(unit_settings(ETC / "mxmrelay.socket")["Backlog"], ["1024"])
        self.assertEqual(one("User"), "mxmrelay")
        self.assertEqual(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE")
        self.assertEqual(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE")
        for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome",
                    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                    "ProtectControlGroups", "RestrictNamespaces", "LockPersonality"):
            self.assertEqual(one(key), "yes", key)
        self.assertEqual(one("ProtectSystem"), "strict")
        self.assertEqual(set(one("RestrictAddressFamilies").split()),
                         {"AF_INET", "AF_INET6", "AF_UNIX"})
        self.assertIn("@system-service", unit["SystemCallFilter"])
        self.assertIn("/var/lib/mxmrelay", one("ReadWritePaths"))
        self.assertEqual(one("Restart"), "on-failure")
        # Breaks pyOpenSSL's cffi callbacks (see the comment in the unit).
        self.assertNotIn("MemoryDenyWriteExecute", unit)

    async def test_systemd_analyze_verify(self) -> None:
        """The units exactly as shipped, in a root tree of their own: this
        system's unit files (for the targets they name), the units in
        /etc/systemd/system, and the project's own twistd and mxmrelay-check
        at the paths the service names.  Not a single complaint."""
        analyze = need("systemd-analyze")
        root = folder_for(self) / "root"
        system = next((d for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                       if (d / "sysinit.target").exists()), None)
        if system is None:
            raise unittest.SkipTest("no systemd unit files on this machine")
        shutil.copytree(system, root / system.relative_to("/"), symlinks=True)
        units = root / "etc/systemd/system"
        units.mkdir(parents=True)
        for name in ("mxmrelay.socket", "mxmrelay.service"):
            shutil.copy(ETC / name, units / name)
        service = unit_settings(ETC / "mxmrelay.service")
        programs = [Path(v.lstrip("-+!@:").split()[0]) for k, vs in service.items()
                    if k.startswith("Exec") for v in vs]
        self.assertEqual({p.parent for p in programs}, {Path("/opt/mxmrelay/venv/bin")})
        for program in programs:
            ours = BIN / program.name
            if not ours.exists():
                raise unittest.SkipTest(f"{ours} is missing: pip install the project")
            installed = root / program.relative_to("/")
            installed.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ours, installed)

        async def verify() -> tuple[str, int]:
            return await run(analyze, "verify", f"--root={root}",
                             "mxmrelay.socket", "mxmrelay.service")

        output, code = await verify()
        self.assertEqual((output, code), ("", 0))
        # The tree is what is checked: without the check, the unit is wrong.
        (root / "opt/mxmrelay/venv/bin/mxmrelay-check").unlink()
        output, code = await verify()
        self.assertNotEqual(code, 0)
        self.assertIn("/opt/mxmrelay/venv/bin/mxmrelay-check is not executable", output)

    async def test_production_example_passes_the_check(self) -> None:
        """etc/mxmrelay.toml as shipped, with /etc/mxmrelay/ moved to a
        folder holding a directory, a certificate for its hostname and the
        key: mxmrelay-check (what ExecStartPre runs) finds nothing wrong."""
        if importlib.util.find_spec("mxmrelay.check") is None:
            raise unittest.SkipTest("mxmrelay/check.py is not there yet")
        folder = folder_for(self)
        text = (ETC / "mxmrelay.toml").read_text()
        self.assertIn('"/etc/mxmrelay/', text)
        config = folder / "mxmrelay.toml"
        config.write_text(text.replace('"/etc/mxmrelay/', f'"{folder}/'))
        shutil.copy(DEV_DIRECTORY, folder / "directory.toml")
        cert, key = make_certificate(folder / "tls", "smtp.example.net")
        cert.rename(folder / "tls" / "fullchain.pem")
        key.rename(folder / "tls" / "privkey.pem")
        output, code = await run(sys.executable, "-m", "mxmrelay.check", "--config", config)
        self.assertEqual((output.strip(), code), ("ok", 0))
        # and it does look: without the key, it says so and fails
        (folder / "tls" / "privkey.pem").unlink()
        output, code = await run(sys.executable, "-m", "mxmrelay.check", "--config", config)
        self.assertEqual(code, 1, output)
        self.assertIn("tls.private_key", output)
