"""The reference delivery API over real HTTP on loopback, with treq.

Each test opens its own database in a temporary folder, serves it with
:meth:`ReferenceAPI.site` on an ephemeral port, and cleans both up, so the
reactor is left clean for trial.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
        self.check(one, "get", await self.request("GET", "/v1/sends/send-1"))
        self.check(one, "get", await self.request("GET", "/v1/sends/unknown"))
        self.check(message_path, "get", await self.request("GET", "/v1/sends/unknown/message"))
        listed = (await self.request("GET", "/v1/sends")).json()["sends"]
        self.assertEqual(len(listed), 1)
