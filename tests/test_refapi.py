"""The reference delivery API over real HTTP on loopback, with treq.

Each test opens its own database in a temporary folder, serves it with
:meth:`ReferenceAPI.site` on an ephemeral port, and cleans both up, so the
reactor is left clean for trial.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from mxmrelay.refapi import ReferenceAPI

TOKEN = "s3cret-token"
BOUNDARY = b"mxmrelay-7c1d2e3f4a5b"
SPEC_PATH = Path(__file__).parent.parent / "docs" / "delivery-api.yaml"


def metadata(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "id": "send-1",
        "customer": "demo",
        "user": "demo@example.com",
        "mail_from": "app@example.com",
        "return_path": "bounces+send-1@mxm.example.net",
        "to": "someone@example.org",
        "bcc": None,
        "flags": 3,
        "bcc_flags": None,
        "tags": ["order", "confirmation"],
        "client": {"address": "192.0.2.7", "tls_version": "TLSv1.3", "listener": "submission"},
        "message_id": "<abc@example.com>",
    }
    data.update(changes)
    return data


def message(subject: str = "Your order", body: str = "Thanks for your order.\r\n") -> bytes:
    return (
        "From: Shop <app@example.com>\r\n"
        "To: someone@example.org\r\n"
        f"Subject: {subject}\r\n"
        "Message-ID: <abc@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"{body}"
    ).encode()


def multipart(meta: dict[str, Any] | bytes, msg: bytes, boundary: bytes = BOUNDARY) -> bytes:
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode("utf-8")
    return b"".join(
        [
            b"--" + boundary + b"\r\n",
            b'Content-Disposition: form-data; name="metadata"\r\n',
            b"Content-Type: application/json\r\n\r\n",
            raw,
            b"\r\n--" + boundary + b"\r\n",
            b'Content-Disposition: form-data; name="message"\r\n',
            b"Content-Type: message/rfc822\r\n\r\n",
            msg,
            b"\r\n--" + boundary + b"--\r\n",
        ]
    )


CONTENT_TYPE = b"multipart/form-data; boundary=" + BOUNDARY


class Response:
    """What a test needs of a response: status, headers, body (read whole)."""

    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return None if not values else values[0].decode("latin-1")

    def json(self) -> Any:
        return json.loads(self.body)


class APITestCase(unittest.TestCase):
    def setUp(self) -> None:
        # Non-persistent connections: each response ends with the connection,
        # so nothing is left open in the reactor when a test ends.
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.folder = Path(self.mktemp())
        self.folder.mkdir(parents=True)
        self.api, self.url = self.serve()

    def serve(
        self, database: Path | None = None, *, max_body: int | None = None, plain: bool = False
    ) -> tuple[ReferenceAPI, str]:
        kwargs = {} if max_body is None else {"max_body": max_body}
        api = ReferenceAPI.open(database or self.folder / "sends.sqlite3", TOKEN, **kwargs)
        self.addCleanup(api.close)
        site = Site(api.resource) if plain else api.site()
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return api, f"http://127.0.0.1:{port.getHost().port}"

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        url: str | None = None,
        **headers: str | bytes,
    ) -> Response:
        h = Headers({k.replace("_", "-"): [v] for k, v in headers.items()})
        response = await self.http.request(method, (url or self.url) + path, data=body, headers=h)
        content = await response.content()
        return Response(response.code, response.headers, content)

    async def post(
        self,
        body: bytes,
        *,
        key: str | None = "key-1",
        token: str | None = TOKEN,
        content_type: bytes = CONTENT_TYPE,
        url: str | None = None,
    ) -> Response:
        headers: dict[str, str | bytes] = {"Content-Type": content_type}
        if key is not None:
            headers["Idempotency-Key"] = key
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.request("POST", "/v1/sends", body, url=url, **headers)

    async def store(self, send_id: str, key: str | None = None, **changes: Any) -> Response:
        msg = changes.pop("msg", message())
        response = await self.post(
            multipart(metadata(id=send_id, **changes), msg), key=key or f"key-{send_id}"
        )
        self.assertEqual(response.code, 201, response.body)
        return response

    async def list_ids(self, query: str = "") -> list[str]:
        response = await self.request("GET", "/v1/sends" + query)
        self.assertEqual(response.code, 200, response.body)
        return [s["id"] for s in response.json()["sends"]]

    async def assert_error(self, response: Response, code: int, pattern: str = "") -> None:
        self.assertEqual(response.code, code, response.body)
        self.assertEqual(response.header("Content-Type"), "application/json")
        error = response.json()["error"]
        self.assertIsInstance(error, str)
        if pattern:
            self.assertRegex(error, pattern)


class StoreAndReadBack(APITestCase):
    async def test_store_and_read_back(self) -> None:
        # 8-bit bytes, a NUL, a bare LF, and a line that starts like the
        # boundary without being it: all message content.
        msg = message(body="Grüße\r\n") + bytes(range(256)) + b"\r\n--" + BOUNDARY + b"x\r\nend"
        response = await self.post(multipart(metadata(), msg))
        self.assertEqual(response.code, 201, response.body)
        self.assertEqual(response.json(), {"id": "send-1"})
        self.assertEqual(response.header("Location"), "/v1/sends/send-1")

        one = await self.request("GET", "/v1/sends/send-1")
        self.assertEqual(one.code, 200)
        stored = one.json()
        expected = metadata()
        del expected["version"]
        self.assertEqual({k: stored[k] for k in expected}, expected)
        self.assertEqual(stored["size"], len(msg))
        self.assertEqual(stored["idempotency_key"], "key-1")
        self.assertRegex(stored["received_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

        raw = await self.request("GET", "/v1/sends/send-1/message")
        self.assertEqual(raw.code, 200)
        self.assertEqual(raw.header("Content-Type"), "message/rfc822")
        self.assertEqual(raw.body, msg)

    async def test_multi_megabyte_message(self) -> None:
        line = bytes(range(128, 256)) + b"0123456789" * 10 + b"\r\n"
        msg = message() + line * (5 * 1024 * 1024 // len(line))
        self.assertGreater(len(msg), 5_000_000)
        response = await self.post(multipart(metadata(), msg))
        self.assertEqual(response.code, 201, response.body)
        raw = await self.request("GET", "/v1/sends/send-1/message")
        self.assertEqual(len(raw.body), len(msg))
        self.assertEqual(raw.body, msg)
        one = await self.request("GET", "/v1/sends/send-1")
        self.assertEqual(one.json()["size"], len(msg))

    async def test_all_fields_nullable_and_bcc(self) -> None:
        meta = metadata(
            bcc="audit@example.com",
            bcc_flags=0,
            tags=[],
            message_id=None,
            client={"address": "2001:db8::1", "tls_version": None, "listener": "smtp"},
        )
        response = await self.post(multipart(meta, message()))
        self.assertEqual(response.code, 201, response.body)
        stored = (await self.request("GET", "/v1/sends/send-1")).json()
        self.assertEqual(stored["bcc"], "audit@example.com")
        self.assertEqual(stored["bcc_flags"], 0)
        self.assertEqual(stored["tags"], [])
        self.assertIsNone(stored["message_id"])
        self.assertIsNone(stored["client"]["tls_version"])

    async def test_plain_site(self) -> None:
        """Under a plain ``Site`` (twisted.web parsing the body too) it still works."""
        _, url = self.serve(self.folder / "plain.sqlite3", plain=True)
        msg = message() + b"\xff\xfe 8-bit\r\n"
        response = await self.post(multipart(metadata(), msg), url=url)
        self.assertEqual(response.code, 201, response.body)
        raw = await self.request("GET", "/v1/sends/send-1/message", url=url)
        self.assertEqual(raw.body, msg)


class Refusals(APITestCase):
    async def test_missing_or_wrong_token(self) -> None:
        body = multipart(metadata(), message())
        for token, invalid in [(None, False), ("wrong", True), (TOKEN + "x", True), ("", True)]:
            response = await self.post(body, token=token)
            await self.assert_error(response, 401)
            challenge = response.header("WWW-Authenticate") or ""
            self.assertTrue(challenge.startswith("Bearer"), challenge)
            self.assertEqual("invalid_token" in challenge, invalid)
        response = await self.request(
            "POST", "/v1/sends", body, Authorization=f"Basic {TOKEN}", Idempotency_Key="k"
        )
        await self.assert_error(response, 401)
        self.assertEqual(await self.list_ids(), [])

    async def test_idempotency_key_required_and_checked(self) -> None:
        body = multipart(metadata(), message())
        for key in [None, "", "x" * 129, "has space", "slash/y", "dot.y", "ünï"]:
            response = await self.post(body, key=key.encode().decode("latin-1") if key else key)
            await self.assert_error(response, 400, "Idempotency-Key")
        response = await self.post(body, key="K" * 128)
        self.assertEqual(response.code, 201)

    async def test_bad_multipart(self) -> None:
        good_meta = json.dumps(metadata()).encode()
        part_meta = (
            b'Content-Disposition: form-data; name="metadata"\r\n'
            b"Content-Type: application/json\r\n\r\n" + good_meta
        )
        part_msg = (
            b'Content-Disposition: form-data; name="message"\r\n'
            b"Content-Type: message/rfc822\r\n\r\n" + message()
        )
        d = b"--" + BOUNDARY

        def parts(*ps: bytes, close: bool = True) -> bytes:
            return b"".join(d + b"\r\n" + p + b"\r\n" for p in ps) + (
                d + b"--\r\n" if close else b""
            )

        cases: list[tuple[str, bytes, bytes]] = [
            ("not multipart", b"{}", b"application/json"),
            ("no boundary", multipart(metadata(), message()), b"multipart/form-data"),
            ("other boundary", multipart(metadata(), message(), b"other"), CONTENT_TYPE),
            ("empty body", b"", CONTENT_TYPE),
            ("one part", parts(part_meta), CONTENT_TYPE),
            ("wrong order", parts(part_msg, part_meta), CONTENT_TYPE),
            ("three parts", parts(part_meta, part_msg, part_msg), CONTENT_TYPE),
            ("not closed", parts(part_meta, part_msg, close=False), CONTENT_TYPE),
            (
                "message not rfc822",
                parts(part_meta, part_msg.replace(b"message/rfc822", b"text/plain")),
                CONTENT_TYPE,
            ),
            (
                "metadata not json",
                parts(part_meta.replace(b"application/json", b"text/plain"), part_msg),
                CONTENT_TYPE,
            ),
            (
                "no disposition",
                parts(part_meta.split(b"\r\n", 1)[1], part_msg),
                CONTENT_TYPE,
            ),
            (
                "empty message",
                parts(part_meta, part_msg.split(b"\r\n\r\n")[0] + b"\r\n\r\n"),
                CONTENT_TYPE,
            ),
            (
                "base64 message",
                parts(
                    part_meta,
                    part_msg.replace(
                        b"\r\n\r\n", b"\r\nContent-Transfer-Encoding: base64\r\n\r\n", 1
                    ),
                ),
                CONTENT_TYPE,
            ),
        ]
        for name, body, content_type in cases:
            response = await self.post(body, content_type=content_type, key=f"k{len(name)}")
            self.assertEqual(response.code, 400, f"{name}: {response.body!r}")
            await self.assert_error(response, 400)
        self.assertEqual(await self.list_ids(), [])
        # The same parts, well formed, and with a preamble: accepted.
        response = await self.post(b"preamble\r\n" + parts(part_meta, part_msg))
        self.assertEqual(response.code, 201, response.body)

    async def test_bad_json(self) -> None:
        for raw in [b"{", b"[]", b'"x"', b"\xff{}", b'{"version": NaN}', b"[" * 100_000]:
            response = await self.post(multipart(raw, message()))
            await self.assert_error(response, 400, "metadata")

    async def test_schema_violations(self) -> None:
        no_listener = {"address": "192.0.2.1", "tls_version": None}
        for change in SCHEMA_VIOLATIONS:
            response = await self.post(multipart(violating(change), message()))
            await self.assert_error(response, 400, "metadata")
        missing = metadata()
        del missing["bcc"]
        response = await self.post(multipart(missing, message()))
        await self.assert_error(response, 400, "bcc")
        response = await self.post(multipart(metadata(client=no_listener), message()))
        await self.assert_error(response, 400, "listener")
        self.assertEqual(await self.list_ids(), [])

    async def test_too_large(self) -> None:
        _, url = self.serve(self.folder / "small.sqlite3", max_body=4096)
        big = multipart(metadata(), message(body="x" * 5000))
        response = await self.post(big, url=url)
        await self.assert_error(response, 413)
        small = multipart(metadata(), message())
        response = await self.post(small, url=url)
        self.assertEqual(response.code, 201)
        # A plain Site spools it all, but the resource still refuses it.
        _, plain = self.serve(self.folder / "plain.sqlite3", max_body=4096, plain=True)
        await self.assert_error(await self.post(big, url=plain), 413)

    async def test_other_methods(self) -> None:
        for method, path in [
            ("PUT", "/v1/sends"),
            ("DELETE", "/v1/sends/send-1"),
            ("POST", "/v1/sends/send-1/message"),
        ]:
            response = await self.request(method, path)
            await self.assert_error(response, 405)
            self.assertIn("GET", response.header("Allow") or "")
        response = await self.request("POST", "/")
        self.assertEqual(response.code, 405)

    async def test_not_found(self) -> None:
        await self.store("exists")
        for path in [
            "/v1/sends/nope",
            "/v1/sends/nope/message",
            "/v1/sends/bad.id",
            "/v1/sends/exists/other",
            "/v1/other",
        ]:
            await self.assert_error(await self.request("GET", path), 404)
        for path in ["/sends/nope", "/nope", "/sends/exists/x"]:
            response = await self.request("GET", path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(response.header("Content-Type"), "text/html; charset=utf-8")


def violating(change: tuple[str, Any]) -> dict[str, Any]:
    return metadata(**{change[0]: change[1]})


SCHEMA_VIOLATIONS: list[tuple[str, Any]] = [
    ("flags", 16),
    ("flags", -1),
    ("flags", "3"),
    ("flags", True),
    ("bcc_flags", 16),
    ("tags", "order"),
    ("tags", [1]),
    ("tags", None),
    ("version", 2),
    ("id", "has/slash"),
    ("id", "x" * 65),
    ("id", ""),
    ("to", ""),
    ("to", None),
    ("bcc", 5),
    ("customer", ["demo"]),
    ("message_id", 1),
    ("client", "192.0.2.1"),
    ("client", {"address": "192.0.2.1", "tls_version": None, "listener": "smtp", "x": 1}),
    ("surprise", 1),
]


class Idempotency(APITestCase):
    async def test_replay_returns_first_id(self) -> None:
        first = await self.post(multipart(metadata(id="first"), message()), key="same")
        self.assertEqual(first.code, 201)
        again = await self.post(multipart(metadata(id="second"), message("other")), key="same")
        self.assertEqual(again.code, 200, again.body)
        self.assertEqual(again.json(), {"id": "first", "duplicate": True})
        self.assertEqual(await self.list_ids(), ["first"])
        await self.assert_error(await self.request("GET", "/v1/sends/second"), 404)
        raw = await self.request("GET", "/v1/sends/first/message")
        self.assertEqual(raw.body, message())

    async def test_replay_is_still_checked(self) -> None:
        await self.store("first", key="same")
        response = await self.post(multipart(metadata(flags=99), message()), key="same")
        await self.assert_error(response, 400)

    async def test_keys_are_per_customer(self) -> None:
        await self.store("a", key="same")
        response = await self.post(
            multipart(metadata(id="b", customer="acme"), message()), key="same"
        )
        self.assertEqual(response.code, 201)
        self.assertEqual(await self.list_ids(), ["b", "a"])

    async def test_same_id_other_key_conflicts(self) -> None:
        await self.store("a", key="one")
        response = await self.post(multipart(metadata(id="a"), message()), key="two")
        await self.assert_error(response, 409)

    async def test_concurrent_posts_store_one(self) -> None:
        responses = await gatherResults(
            [
                ensureDeferred(
                    self.post(multipart(metadata(id=f"race-{i}"), message()), key="race")
                )
                for i in range(2)
            ]
        )
        await self.assert_one_winner(responses)

    async def test_concurrent_writers_on_one_database(self) -> None:
        """Two API instances (two connections, two threads) on one file."""
        _, other = self.serve()
        responses = await gatherResults(
            [
                ensureDeferred(
                    self.post(multipart(metadata(id=f"race-{i}"), message()), key="race", url=url)
                )
                for i, url in enumerate([self.url, other] * 2)
            ]
        )
        await self.assert_one_winner(responses)

    async def assert_one_winner(self, responses: list[Response]) -> None:
        codes = sorted(r.code for r in responses)
        self.assertEqual(codes, [200] * (len(responses) - 1) + [201])
        winner = next(r.json()["id"] for r in responses if r.code == 201)
        self.assertEqual({r.json()["id"] for r in responses}, {winner})
        self.assertEqual(await self.list_ids(), [winner])


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


class OpenAPIDocument(APITestCase):
    """``docs/delivery-api.yaml`` is valid, and describes what the API does."""

    def setUp(self) -> None:
        super().setUp()
        self.spec = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
        resource = Resource.from_contents(self.spec, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource("urn:delivery-api", resource)

    def validator(self, pointer: str) -> Draft202012Validator:
        return Draft202012Validator(
            {"$ref": "urn:delivery-api#" + pointer},
            registry=self.registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )

    def check(self, path: str, method: str, response: Response) -> None:
        """``response`` matches the document's schema for its status code."""
        responses = self.spec["paths"][path][method]["responses"]
        described = responses.get(str(response.code))
        self.assertIsNotNone(described, f"{method} {path}: {response.code} is not documented")
        escaped = path.replace("~", "~0").replace("/", "~1")
        pointer = f"/paths/{escaped}/{method}/responses/{response.code}"
        if "$ref" in described:
            pointer = described["$ref"].removeprefix("#")
        self.validator(pointer + "/content/application~1json/schema").validate(response.json())
        self.assertEqual(response.header("Content-Type"), "application/json")

    def test_document_is_valid_openapi_3_1(self) -> None:
        validate_spec(self.spec)
        self.assertTrue(self.spec["openapi"].startswith("3.1"))
        self.assertEqual(self.spec["info"]["version"], "1")
        schemas = self.spec["components"]["schemas"]
        for name in ["Send", "SendMetadata", "Error", "SendCreated", "SendList"]:
            self.assertIn(name, schemas)

    def test_metadata_schema_agrees_with_the_api(self) -> None:
        schema = self.validator("/components/schemas/SendMetadata")
        schema.validate(metadata())
        for change in SCHEMA_VIOLATIONS:
            self.assertFalse(schema.is_valid(violating(change)), change)

    async def test_responses_match_the_document(self) -> None:
        sends, one, message_path = "/v1/sends", "/v1/sends/{id}", "/v1/sends/{id}/message"
        body = multipart(metadata(bcc="b@example.org", bcc_flags=0), message())
        created = await self.post(body)
        self.assertEqual(created.code, 201)
        self.check(sends, "post", created)
        duplicate = await self.post(body)
        self.assertEqual(duplicate.code, 200)
        self.check(sends, "post", duplicate)
        for response in [
            await self.post(b"nonsense"),
            await self.post(body, token="wrong"),
            await self.post(body, key=None),
            await self.post(multipart(metadata(id="a", flags=16), message()), key="k2"),
            await self.post(multipart(metadata(id="send-1"), message()), key="k3"),
            await self.request("PATCH", "/v1/sends"),
        ]:
            self.check(sends, "post", response)
        self.check(sends, "get", await self.request("GET", "/v1/sends"))
        self.check(sends, "get", await self.request("GET", "/v1/sends?tag=order&limit=1"))
        self.check(sends, "get", await self.request("GET", "/v1/sends?limit=0"))
        await self.store("send-2", bcc="b@example.org", bcc_flags=0)
        await self.store("send-3")
        first = await self.request("GET", "/v1/sends?limit=1&to=B@example.org")
        self.check(sends, "get", first)
        self.assertEqual((first.json()["next"], first.json()["prev"]), ("send-2", None))
        middle = await self.request("GET", "/v1/sends?limit=1&before=send-3&since=2000-01-01")
        self.check(sends, "get", middle)
        self.assertEqual((middle.json()["next"], middle.json()["prev"]), ("send-2", "send-2"))
        for query in [
            "before=nope",
            "after=a.b",
            "since=x",
            "until=2000-01-01T00:00Z",
            "to=x",
            "x=1",
        ]:
            response = await self.request("GET", "/v1/sends?" + query)
            self.assertEqual(response.code, 400, query)
            self.check(sends, "get", response)
        parameters = {
            p["$ref"].rsplit("/", 1)[1] for p in self.spec["paths"][sends]["get"]["parameters"]
        }
        self.assertEqual(parameters, {"Tag", "To", "Since", "Until", "Before", "After", "Limit"})
        self.check(one, "get", await self.request("GET", "/v1/sends/send-1"))
        self.check(one, "get", await self.request("GET", "/v1/sends/unknown"))
        self.check(message_path, "get", await self.request("GET", "/v1/sends/unknown/message"))
        listed = (await self.request("GET", "/v1/sends")).json()["sends"]
        self.assertEqual(len(listed), 3)
