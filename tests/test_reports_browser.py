"""The HTML reports as a real browser sees them: headless Chromium's DOM.

The server runs in this process's reactor, so Chromium is run with
``getProcessOutputAndValue`` (never a blocking subprocess call).  The four
pages are loaded by four Chromium processes at once, to keep the test
short; each has its own profile folder.
"""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from mxmrelay_refapi.api import ReferenceAPI
from tests.helpers import listen

CHROMIUM = "/usr/bin/chromium"
#: Seconds for one page; Chromium normally needs one or two.
CHROMIUM_TIMEOUT = 60
TOKEN = "browser-test-token"

HOSTILE_TAG = '<script>document.title="pwned-tag"</script>'
HOSTILE_SUBJECT = '<img src=x onerror="document.title=1"> <script>alert(2)</script>'
HOSTILE_NAME = '"<img src=y onerror=alert(3)>" <app@example.com>'
BODY_TEXT = "Hello <b>friend</b>, your order has shipped."


def multipart(meta: str, message: bytes) -> bytes:
    b = b"browser-boundary-1234"
    return b"".join(
        [
            b"--" + b + b'\r\nContent-Disposition: form-data; name="metadata"\r\n',
            b"Content-Type: application/json\r\n\r\n" + meta.encode() + b"\r\n",
            b"--" + b + b'\r\nContent-Disposition: form-data; name="message"\r\n',
            b"Content-Type: message/rfc822\r\n\r\n" + message + b"\r\n",
            b"--" + b + b"--\r\n",
        ]
    )


def metadata(send_id: str, tags: list[str], flags: int) -> str:
    return json.dumps(
        {
            "version": 1,
            "id": send_id,
            "customer": "demo",
            "user": "demo@example.com",
            "mail_from": "app@example.com",
            "return_path": "bounces@mxm.example.net",
            "to": "someone@example.org",
            "bcc": "audit@example.com" if flags else None,
            "flags": flags,
            "bcc_flags": 0 if flags else None,
            "tags": tags,
            "client": {"address": "192.0.2.1", "tls_version": "TLSv1.3", "listener": "smtp"},
            "message_id": None,
        }
    )


def message(subject: str, sender: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: someone@example.org\r\nSubject: {subject}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{BODY_TEXT}\r\n<script>alert(5)</script>\r\n"
    ).encode()


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> list[Element]:
        out: list[Element] = [self]
        for c in self.children:
            if isinstance(c, Element):
                out.extend(c.iter())
        return out

    def find_all(self, tag: str, **attrs: str) -> list[Element]:
        return [
            e
            for e in self.iter()
            if e.tag == tag
            and all(v in e.attrs.get(k.rstrip("_"), "").split() for k, v in attrs.items())
        ]


class DOM(HTMLParser):
    """Chromium's ``--dump-dom`` output, as a tree (it is well-formed HTML)."""

    VOID = frozenset("area base br col embed hr img input link meta source track wbr".split())

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.current = Element("#document", {}, None)
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in self.VOID:
            self.current = element

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


class _Spawner:
    """The reactor, remembering the processes it spawns, so a hung Chromium
    can be stopped (``getProcessOutputAndValue`` does not hand them out)."""

    def __init__(self) -> None:
        self.processes: list[IProcessTransport] = []

    def spawnProcess(self, *args: Any, **kwargs: Any) -> IProcessTransport:
        process = reactor.spawnProcess(*args, **kwargs)
        self.processes.append(process)
        return process

    def signal(self, name: str) -> None:
        for process in self.processes:
            if process.pid is not None:
                process.signalProcess(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class ReportsInChromium(unittest.TestCase):
    timeout = 3 * CHROMIUM_TIMEOUT

    def setUp(self) -> None:
        if not os.path.exists(CHROMIUM):
            raise unittest.SkipTest(f"{CHROMIUM} is not installed (apt-get install chromium)")
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        self.folder = folder
        self.api = ReferenceAPI.open(folder / "sends.sqlite3", TOKEN, reactor=reactor)
        self.addCleanup(self.api.close)
        port, number = listen(self.api.site())
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{number}"

    async def store(self, send_id: str, tags: list[str], flags: int, msg: bytes) -> None:
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        headers = Headers(
            {
                b"Authorization": [b"Bearer " + TOKEN.encode()],
                b"Idempotency-Key": [send_id.encode()],
                b"Content-Type": [b"multipart/form-data; boundary=browser-boundary-1234"],
            }
        )
        body = multipart(metadata(send_id, tags, flags), msg)
        response = await http.post(self.url + "/v1/sends", data=body, headers=headers)
        content = await response.content()
        self.assertEqual(response.code, 201, content)

    async def dump_dom(self, path: str) -> DOM:
        profile = self.folder / f"profile-{len(os.listdir(self.folder))}"
        profile.mkdir()
        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--dump-dom",
            self.url + path,
        ]
        spawner = _Spawner()
        result: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
            CHROMIUM, args, env=dict(os.environ), reactor=spawner
        )
        # TERM first (Chromium then stops its helper processes), KILL later.
        timers = [
            reactor.callLater(CHROMIUM_TIMEOUT, spawner.signal, "TERM"),
            reactor.callLater(CHROMIUM_TIMEOUT + 10, spawner.signal, "KILL"),
        ]
        try:
            out, err, code = await result
        except BaseException as e:
            self.fail(f"chromium {path}: stopped after {CHROMIUM_TIMEOUT}s ({e!r})")
        finally:
            for timer in timers:
                if timer.active():
                    timer.cancel()
        self.assertEqual(code, 0, f"chromium {path} failed: {err[-2000:]!r}")
        return DOM(out.decode("utf-8"))

    async def test_pages_in_chromium(self) -> None:
        await self.store(
            "older", ["order", "x"], 3, message("Your order", "Shop <app@example.com>")
        )
        await self.store("newer", [HOSTILE_TAG, "x"], 0, message(HOSTILE_SUBJECT, HOSTILE_NAME))
        subject = "=?utf-8?q?Gr=C3=BC=C3=9Fe=2C?= No tags"
        await self.store("untagged", [], 1, message(subject, "app@example.com"))
        paths = ["/", "/?tag=x", "/sends/newer", "/?limit=1&before=untagged"]
        index, filtered, page, paged = await gatherResults(
            [ensureDeferred(self.dump_dom(p)) for p in paths]
        )

        for dom in (index, filtered, page, paged):
            self.assert_inert(dom)

        rows = index.root.find_all("tr", class_="send")
        self.assertEqual(
            [r.attrs["id"] for r in rows], ["send-untagged", "send-newer", "send-older"]
        )
        older = rows[2]
        self.assertEqual(
            older.find_all("td", class_="flags")[0].text(), "open tracking, click tracking"
        )
        self.assertEqual(older.find_all("td", class_="bcc")[0].text(), "audit@example.com")
        links = older.find_all("a")
        self.assertEqual(links[0].attrs["href"], "/sends/older")
        hostile_tags = [a.text() for a in rows[1].find_all("a", class_="tag")]
        self.assertEqual(hostile_tags, [HOSTILE_TAG, "x"])
        subjects = [r.find_all("td", class_="subject")[0].text() for r in rows]
        self.assertEqual(subjects, ["Grüße, No tags", HOSTILE_SUBJECT, "Your order"])
        form = index.root.find_all("form")[0]
        self.assertEqual(form.attrs.get("method"), "get")
        self.assertTrue(any(i.attrs.get("name") == "tag" for i in form.find_all("input")))

        rows = paged.root.find_all("tr", class_="send")
        self.assertEqual([r.attrs["id"] for r in rows], ["send-newer"])
        hrefs = {
            a.attrs["id"]: a.attrs["href"] for a in paged.root.find_all("a") if "id" in a.attrs
        }
        self.assertEqual(hrefs["older"], "/?limit=1&before=newer")
        self.assertEqual(hrefs["newer"], "/?limit=1&after=newer")
        self.assertEqual(hrefs["newest"], "/?limit=1")

        rows = filtered.root.find_all("tr", class_="send")
        self.assertEqual([r.attrs["id"] for r in rows], ["send-newer", "send-older"])
        values = [
            i.attrs.get("value")
            for i in filtered.root.find_all("input")
            if i.attrs.get("name") == "tag"
        ]
        self.assertIn("x", values)

        headers = {
            th.text(): td.text()
            for row in page.root.find_all("table", id="headers")[0].find_all("tr")
            for th, td in [(row.find_all("th")[0], row.find_all("td")[0])]
        }
        self.assertEqual(headers["Subject"], HOSTILE_SUBJECT)
        self.assertEqual(headers["From"], HOSTILE_NAME)
        body = page.root.find_all("section", id="body")[0].text()
        self.assertIn(BODY_TEXT, body)
        self.assertIn("<script>alert(5)</script>", body)
        raw = page.root.find_all("a", id="raw")[0]
        self.assertEqual(raw.attrs["href"], "/v1/sends/newer/message")
        metadata_text = page.root.find_all("table", id="metadata")[0].text()
        self.assertIn(HOSTILE_TAG, metadata_text)

    def assert_inert(self, dom: DOM) -> None:
        """No script or image from content: the hostile markup is only text."""
        elements = dom.root.iter()
        self.assertEqual([e for e in elements if e.tag in ("script", "img", "iframe")], [])
        handlers = [(e.tag, k) for e in elements for k in e.attrs if k.startswith("on")]
        self.assertEqual(handlers, [])
        titles = [e.text() for e in dom.root.find_all("title")]
        self.assertNotIn("pwned", " ".join(titles))
