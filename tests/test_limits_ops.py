"""The limits as operators meet them: /readyz while Redis is down, and
mxmrelay-check naming a broken [limits] or [state] key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from mxmrelay.health import Readiness, ReadyPage
from tests.test_check import good_config


class ReadyWhileRedisDown(SynchronousTestCase):
    def body(self, note: str | None) -> tuple[int, bytes]:
        clock = Clock()
        readiness = Readiness(clock=clock, serving=lambda: True, last_answer=lambda: 0.0,
                              probe=lambda: succeed(None), window=60, note=lambda: note)
        request = DummyRequest([b""])
        ReadyPage(readiness).render_GET(request)  # type: ignore[arg-type]
        return request.responseCode or 200, b"".join(request.written)

    def test_still_ready_with_the_reason(self) -> None:
        """Mail keeps flowing without Redis: 200, the reason in the body."""
        self.assertEqual(self.body(None), (200, b"ready\n"))
        self.assertEqual(self.body("redis unreachable"), (200, b"ready: redis unreachable\n"))


class Check(SynchronousTestCase):
    def test_broken_limit_names_file_and_key(self) -> None:
        from mxmrelay.check import main
        from tests.helpers import write

        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        data: dict[str, Any] = good_config(folder)
        data["limits"] = {"sends_per_day": 0}
        data["state"] = {"redis": "http://nowhere"}
        path = write(folder, "bad.toml", data)
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["--config", str(path)])
        text = out.getvalue()
        self.assertEqual(code, 1, text)
        self.assertIn(f"{path}: limits.sends_per_day: must be a whole number of at least 1",
                      text)
        self.assertIn(f"{path}: state.redis: must be redis://HOST[:PORT][/DB]", text)
