"""The reference API's reports: the JSON list and its paging, the HTML pages."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from tests.refapi_support import APITestCase, Response, message


class Reports(APITestCase):
    async def test_tags_limit_newest_first(self) -> None:
        tagged = {
            "s1": ["a", "b"],
            "s2": ["a"],
            "s3": ["b", "c"],
            "s4": ["c", "b", "a"],
            "s5": ["a b", "ä"],
        }
        for send_id, tags in tagged.items():
            await self.store(send_id, tags=tags)
        self.assertEqual(await self.list_ids(), ["s5", "s4", "s3", "s2", "s1"])
        self.assertEqual(await self.list_ids("?tag=a"), ["s4", "s2", "s1"])
        self.assertEqual(await self.list_ids("?tag=a&tag=b"), ["s4", "s1"])
        self.assertEqual(await self.list_ids("?tag=b&tag=a&tag=c"), ["s4"])
        self.assertEqual(await self.list_ids("?tag=a&tag=zzz"), [])
        self.assertEqual(await self.list_ids("?tag=" + quote("a b")), ["s5"])
        self.assertEqual(await self.list_ids("?tag=" + quote("ä")), ["s5"])
        self.assertEqual(await self.list_ids("?tag=a&tag="), ["s4", "s2", "s1"])
        self.assertEqual(await self.list_ids("?limit=2"), ["s5", "s4"])
        self.assertEqual(await self.list_ids("?tag=b&limit=1"), ["s4"])
        self.assertEqual(await self.list_ids("?limit=500"), ["s5", "s4", "s3", "s2", "s1"])
        for bad in ["0", "501", "-1", "x", "", "1e2", "99999999999"]:
            response = await self.request("GET", "/v1/sends?limit=" + bad)
            await self.assert_error(response, 400, "limit")

    async def test_default_limit(self) -> None:
        for i in range(51):
            await self.store(f"s{i}")
        ids = await self.list_ids()
        self.assertEqual(len(ids), 50)
        self.assertEqual(ids[0], "s50")


class Paging(APITestCase):
    """``before``/``after`` cursors, ``since``/``until``, ``to``, and their 400s."""

    async def page(self, query: str) -> dict[str, Any]:
        response = await self.request("GET", "/v1/sends" + query)
        self.assertEqual(response.code, 200, response.body)
        page: dict[str, Any] = response.json()
        self.assertEqual(set(page), {"sends", "next", "prev"})
        return page

    async def test_walk_while_sends_arrive(self) -> None:
        """Every send stored before the walk, once, however many arrive during it."""
        tags = {f"s{i:02}": ["t"] if i % 3 else ["t", "other"] for i in range(13)}
        for send_id, send_tags in tags.items():
            await self.store(send_id, tags=send_tags)
        await self.store("untagged", tags=[])
        self.assertEqual(await self.list_ids("?limit=500"), ["untagged", *reversed(tags)])
        for query in ["?limit=5", "?tag=t&limit=4", "?tag=t&tag=other&limit=2"]:
            # What one page of 500 shows when the walk starts (earlier walks
            # stored sends too): the walk must show exactly these.
            expected = await self.list_ids(query.split("limit")[0] + "limit=500")
            seen: list[str] = []
            page = await self.page(query)
            self.assertIsNone(page["prev"])
            pages = 0
            while True:
                seen += [s["id"] for s in page["sends"]]
                pages += 1
                # New sends, newer than the first page, arrive between pages.
                await self.store(f"new-{pages}-{len(seen)}", tags=["t", "other"])
                if page["next"] is None:
                    break
                self.assertEqual(page["next"], seen[-1])
                page = await self.page(f"{query}&before={page['next']}")
                self.assertEqual(page["prev"], page["sends"][0]["id"])
            self.assertEqual(seen, expected, query)
            self.assertGreater(pages, 2)

    async def test_after_pages_back_towards_newer(self) -> None:
        for i in range(7):
            await self.store(f"s{i}")
        page = await self.page("?limit=3&before=s3")
        self.assertEqual([s["id"] for s in page["sends"]], ["s2", "s1", "s0"])
        self.assertEqual((page["next"], page["prev"]), (None, "s2"))
        page = await self.page("?limit=3&after=s2")
        self.assertEqual([s["id"] for s in page["sends"]], ["s5", "s4", "s3"])
        self.assertEqual((page["next"], page["prev"]), ("s3", "s5"))
        page = await self.page("?limit=3&after=s5")
        self.assertEqual([s["id"] for s in page["sends"]], ["s6"])
        self.assertEqual((page["next"], page["prev"]), ("s6", None))
        page = await self.page("?limit=3&before=s0")
        self.assertEqual(page, {"sends": [], "next": None, "prev": None})

    async def test_since_inclusive_until_exclusive(self) -> None:
        for i in range(4):
            await self.store(f"s{i}")
        stamps = {s["id"]: s["received_at"] for s in (await self.page(""))["sends"]}
        self.assertEqual(len(set(stamps.values())), 4)
        at = stamps["s1"]
        self.assertEqual(await self.list_ids(f"?since={at}"), ["s3", "s2", "s1"])
        self.assertEqual(await self.list_ids(f"?until={at}"), ["s0"])
        self.assertEqual(await self.list_ids(f"?since={at}&until={stamps['s3']}"), ["s2", "s1"])
        # The same instant with an offset; a microsecond later excludes s1.
        when = datetime.fromisoformat(at.replace("Z", "+00:00"))
        shifted = when.astimezone(timezone(timedelta(hours=-5))).isoformat()
        self.assertEqual(await self.list_ids("?since=" + quote(shifted)), ["s3", "s2", "s1"])
        later = (when + timedelta(microseconds=1)).isoformat()
        self.assertEqual(await self.list_ids("?since=" + quote(later)), ["s3", "s2"])
        today = at[:10]
        tomorrow = (when + timedelta(days=1)).date().isoformat()
        day = f"?since={today}&until={tomorrow}&limit=2"
        self.assertEqual(await self.list_ids(day), ["s3", "s2"])
        self.assertEqual(await self.list_ids(f"?until={today}"), [])
        self.assertEqual(await self.list_ids(f"?since={tomorrow}"), [])
        # The range and the cursor together: the walk stays inside the range.
        page = await self.page(f"?until={stamps['s3']}&limit=1&before=s2")
        self.assertEqual(([s["id"] for s in page["sends"]], page["next"]), (["s1"], "s1"))

    async def test_to_matches_the_recipient_or_the_bcc(self) -> None:
        await self.store("a1", to="Ann@Example.org")
        await self.store("b1", to="bob@example.org", bcc="ann@example.org", bcc_flags=0)
        await self.store("b2", to="bob@example.org", tags=["reset"])
        await self.store("a2", to="ann@example.org", tags=["reset"])
        await self.store("a3", to="ann@example.org", bcc="ANN@example.org", bcc_flags=0)
        await self.store("x", to="joann@example.org")
        await self.store("y", to="ann@example.org.evil")
        ann = ["a3", "a2", "b1", "a1"]
        self.assertEqual(await self.list_ids("?to=ann@example.org"), ann)
        self.assertEqual(await self.list_ids("?to=" + quote("<ANN@EXAMPLE.ORG>")), ann)
        self.assertEqual(await self.list_ids("?to=ann@example.org&tag=reset"), ["a2"])
        self.assertEqual(await self.list_ids("?to=bob@example.org&tag=reset"), ["b2"])
        self.assertEqual(await self.list_ids("?to=nobody@example.org"), [])
        page = await self.page("?to=ann@example.org&limit=2&before=a3")
        self.assertEqual([s["id"] for s in page["sends"]], ["a2", "b1"])
        self.assertEqual((page["next"], page["prev"]), ("b1", "a2"))

    async def test_bad_parameters_are_400s_naming_them(self) -> None:
        await self.store("s1")
        for query, name in [
            ("before=nope", "before"),
            ("after=nope", "after"),
            ("before=a.b", "before"),
            ("before=", "before"),
            ("before=s1&after=s1", "before"),
            ("since=yesterday", "since"),
            ("since=2025-01-02T03:04:05", "since"),
            ("until=2025-13-01", "until"),
            ("since=2025-01-02&until=2025-01-01", "until"),
            ("to=ann", "to"),
            ("to=a@x&to=b@x", "to"),
            ("to=%FF@x", "to"),
            ("limit=1&limit=2", "limit"),
            ("cursor=s1", "cursor"),
        ]:
            response = await self.request("GET", "/v1/sends?" + query)
            await self.assert_error(response, 400, f"^{name}: ")
            page = await self.request("GET", "/?" + query)
            self.assertEqual(page.code, 400, query)
            self.assertIn(f"{name}: ", page.body.decode())


HOSTILE_TAG = '<script>alert("tag")</script>'
HOSTILE_SUBJECT = "<img src=x onerror=alert(1)> & <script>alert(2)</script>"
HOSTILE_NAME = '"<img src=x onerror=alert(3)>" <app@example.com>'


def hostile_message() -> bytes:
    return (
        f"From: {HOSTILE_NAME}\r\n"
        f"To: someone@example.org\r\n"
        f"Subject: {HOSTILE_SUBJECT}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "\r\n"
        "<p>Hello</p><script>alert(4)</script>\r\n"
    ).encode()


class Pages(APITestCase):
    async def test_index_and_send_page_escape_content(self) -> None:
        await self.store("plain", tags=["order"], flags=3)
        await self.store(
            "hostile",
            tags=[HOSTILE_TAG, "x"],
            to="<b>bold</b>@example.org",
            msg=hostile_message(),
        )
        index = await self.request("GET", "/")
        self.assertEqual(index.code, 200)
        self.assert_safe_page(index)
        page = index.body.decode()
        self.assertIn("open tracking, click tracking", page)
        self.assertIn("&lt;script&gt;alert(&quot;tag&quot;)&lt;/script&gt;", page)
        self.assertIn("&lt;b&gt;bold&lt;/b&gt;@example.org", page)
        self.assertLess(page.index('id="send-hostile"'), page.index('id="send-plain"'))

        one = await self.request("GET", "/sends/hostile")
        self.assertEqual(one.code, 200)
        self.assert_safe_page(one)
        page = one.body.decode()
        self.assertIn("&lt;img src=x onerror=alert(1)&gt; &amp; &lt;script&gt;", page)
        self.assertIn("&quot;&lt;img src=x onerror=alert(3)&gt;&quot;", page)
        self.assertIn("&lt;p&gt;Hello&lt;/p&gt;&lt;script&gt;alert(4)", page)
        self.assertIn('href="/v1/sends/hostile/message"', page)

    def assert_safe_page(self, response: Response) -> None:
        self.assertEqual(
            response.header("Content-Security-Policy"),
            "default-src 'none'; style-src 'unsafe-inline'",
        )
        self.assertEqual(response.header("X-Content-Type-Options"), "nosniff")
        page = response.body.decode()
        self.assertNotIn("<script", page.lower())
        self.assertNotIn("<img", page.lower())
        self.assertIsNone(re.search(r"<[^>]*\son\w+=", page))

    async def test_decoded_headers_and_bad_limit_page(self) -> None:
        msg = (
            b"Subject: =?utf-8?q?Caf=C3=A9_=3Cb=3E?=\r\n"
            b"X-Broken: =?x-unknown?q?abc?= \xff\r\n"
            b"X-Folded: one\r\n two\r\n"
            b"Content-Type: text/plain; charset=iso-8859-1\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n"
            b"\r\n"
            b"Caf=E9\r\n"
        )
        await self.store("enc", msg=msg)
        page = (await self.request("GET", "/sends/enc")).body.decode()
        self.assertIn("Café &lt;b&gt;", page)
        self.assertIn("one two", page)
        self.assertIn("\ufffd", page)
        self.assertIn("Café\n", page)
        response = await self.request("GET", "/?limit=nope")
        self.assertEqual(response.code, 400)
        self.assertIn("limit", response.body.decode())


class IndexPage(HTMLParser):
    """What a test reads of the HTML list: row ids, subjects, links by id, inputs."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[str] = []
        self.subjects: list[str] = []
        self.links: dict[str, str] = {}
        self.inputs: dict[str, str] = {}
        self._in_subject = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and a.get("class") == "send":
            self.rows.append(a["id"].removeprefix("send-"))
        elif tag == "td" and a.get("class") == "subject":
            self._in_subject = True
            self.subjects.append("")
        elif tag == "a" and "id" in a:
            self.links[a["id"]] = a["href"]
        elif tag == "input" and a.get("name") not in (None, "tag"):
            self.inputs[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_subject = False

    def handle_data(self, data: str) -> None:
        if self._in_subject:
            self.subjects[-1] += data


class IndexPaging(APITestCase):
    async def index(self, path: str) -> IndexPage:
        response = await self.request("GET", path)
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual(response.header("Content-Type"), "text/html; charset=utf-8")
        self.assertNotIn("<script", response.body.decode().lower())
        return IndexPage(response.body.decode())

    async def test_subjects_and_page_links(self) -> None:
        subjects = {
            "s0": "=?utf-8?q?Caf=C3=A9_=3Cb=3E?= ready",
            "s1": HOSTILE_SUBJECT,
            "s2": "=?iso-8859-1?b?culzZXQ=?= your password",
            "s3": "Plain",
            "s4": "=?x-unknown?q?abc?=",
        }
        for send_id, subject in subjects.items():
            await self.store(send_id, to="Ann@example.org", msg=message(subject))
        await self.store("none", to="bob@example.org", msg=b"From: a@example.com\r\n\r\nHi\r\n")
        first = await self.index("/?limit=2")
        self.assertEqual(first.rows, ["none", "s4"])
        self.assertEqual(first.subjects, ["(no subject)", "=?x-unknown?q?abc?="])
        self.assertNotIn("newer", first.links)
        self.assertNotIn("newest", first.links)
        page = await self.index(first.links["older"])
        self.assertEqual(page.rows, ["s3", "s2"])
        self.assertEqual(page.subjects, ["Plain", "réset your password"])
        page = await self.index(page.links["older"])
        self.assertEqual(page.rows, ["s1", "s0"])
        self.assertEqual(page.subjects, [HOSTILE_SUBJECT, "Café <b> ready"])
        self.assertNotIn("older", page.links)
        back = await self.index(page.links["newer"])
        self.assertEqual(back.rows, ["s3", "s2"])
        self.assertEqual(parse_qsl(urlsplit(page.links["newest"]).query), [("limit", "2")])

        filtered = await self.index("/?to=ANN%40example.org&limit=3&since=2000-01-01&until=")
        self.assertEqual(filtered.rows, ["s4", "s3", "s2"])
        self.assertEqual(filtered.inputs["to"], "ann@example.org")
        self.assertEqual(filtered.inputs["since"], "2000-01-01")
        self.assertEqual(filtered.inputs["until"], "")
        query = dict(parse_qsl(urlsplit(filtered.links["older"]).query))
        self.assertEqual(
            query,
            {"to": "ann@example.org", "since": "2000-01-01", "limit": "3", "before": "s2"},
        )
        rest = await self.index(filtered.links["older"])
        self.assertEqual(rest.rows, ["s1", "s0"])
        empty = await self.index("/?until=2000-01-01")
        self.assertEqual(empty.rows, [])
