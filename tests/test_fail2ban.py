"""The fail2ban filter (etc/fail2ban/mxmrelay.conf) against the relay's own
log lines, and against fail2ban's own tool where it is installed.
"""

from __future__ import annotations

import re
import smtplib
from typing import Any, cast

from twisted.logger import ILogObserver, formatEventAsClassicLogText, globalLogPublisher
from twisted.trial import unittest

from tests.helpers import ETC, folder_for, need, run
from tests.process_support import banned_hosts
from tests.support import RelayUnderTest, in_thread


class Fail2ban(unittest.TestCase):
    async def failure_log(self) -> tuple[str, int]:
        """Two failed logins to a relay in this process, one with a user name
        that tries to forge a log line; the relay's log as twistd writes it (its own
        formatter: "<timestamp> [<namespace>#<level>] <text>", continuation
        lines indented with a tab), and the number of failures logged."""
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        relay = RelayUnderTest(self)
        forged = ("evil\n2026-11-26T06:00:00+0000 [mxmrelay.smtp#warn] "
                  "auth failure rhost=203.0.113.9 user=x")

        def attempts() -> list[int]:
            codes = []
            for user in ("demo@example.com", forged):
                client = relay.smtp(login=None)
                try:
                    client.login(user, "wrong-password")
                except smtplib.SMTPAuthenticationError as e:
                    codes.append(e.smtp_code)
                finally:
                    client.quit()
            return codes

        # A user name with a line break is refused before any check (501),
        # so the forgery never reaches the log at all.
        self.assertEqual(await in_thread(attempts), [535, 501])
        text = "".join(formatEventAsClassicLogText(e) or "" for e in events
                       if e.get("log_namespace") == "mxmrelay.smtp")
        self.assertNotIn("rhost=203.0.113.9", text)
        # smtplib tries two mechanisms: two failures per login
        failures = sum(1 for e in events
                       if str(e.get("log_format", "")).startswith("auth failure "))
        self.assertGreaterEqual(failures, 2)
        return text, failures

    async def test_filter_matches_the_relays_own_line(self) -> None:
        text, failures = await self.failure_log()
        self.assertRegex(text, r"(?m)^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
                               r"\[mxmrelay\.smtp#warn\] auth failure rhost=127\.0\.0\.1 "
                               r"user=demo@example\.com$")
        # Every failure counts, for the real address; the forged line does not.
        self.assertEqual(banned_hosts(text), ["127.0.0.1"] * failures)
        # The same lines as the journal backend shows them.
        journal = "\n".join(f"mx1 twistd[4242]: {line}" for line in text.splitlines())
        self.assertEqual(banned_hosts(journal), ["127.0.0.1"] * failures)
        # A worker's lines (workers = N) carry its number: still counted.
        from mxmrelay.worker import tagged

        workers = "".join(tagged(line, 3) or "" for line in text.splitlines(keepends=True))
        self.assertIn("[worker 3] auth failure", workers)
        self.assertEqual(banned_hosts(workers), ["127.0.0.1"] * failures)
        self.assertEqual(banned_hosts(
            "2026-11-26T06:00:00+0000 [mxmrelay.smtp#info] auth ok client=192.0.2.1 "
            "user=auth failure rhost=198.51.100.1 user=x"), [])

    async def test_fail2ban_regex(self) -> None:
        """fail2ban's own tool, with its <HOST> and date handling, where it
        is installed (it is not one of the Makefile's test tools)."""
        tool = need("fail2ban-regex")
        text, failures = await self.failure_log()
        log = folder_for(self) / "mxmrelay.log"
        log.write_text(text)
        output, code = await run(tool, "--verbose", log, ETC / "fail2ban" / "mxmrelay.conf")
        self.assertEqual(code, 0, output)
        self.assertRegex(output, rf"Lines: \d+ lines, 0 ignored, {failures} matched")
        # --verbose lists each match: "|      HOST  Thu Nov 26 06:00:00 2026"
        hosts = re.findall(r"(?m)^\|\s+(\S+)\s{2}\w{3} \w{3} +\d+ ", output)
        self.assertEqual(hosts, ["127.0.0.1"] * failures, output)
