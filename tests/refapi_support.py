"""Helpers of the reference API's tests: a send's parts, and a test case
that serves the API on loopback with treq as its client.

Each test opens its own database in a temporary folder, serves it with
:meth:`ReferenceAPI.site` on an ephemeral port, and cleans both up, so the
reactor is left clean for trial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from mxmrelay_refapi.api import ReferenceAPI
from tests.helpers import listen

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
        kwargs: dict[str, Any] = {} if max_body is None else {"max_body": max_body}
        api = ReferenceAPI.open(
            database or self.folder / "sends.sqlite3", TOKEN, reactor=reactor, **kwargs
        )
        self.addCleanup(api.close)
        site = Site(api.resource) if plain else api.site()
        port, number = listen(site)
        self.addCleanup(port.stopListening)
        return api, f"http://127.0.0.1:{number}"

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        url: str | None = None,
        **headers: str | bytes,
    ) -> Response:
        # As Headers encodes text: names ISO-8859-1, values UTF-8.
        h = Headers({k.replace("_", "-").encode("iso-8859-1"):
                     [v.encode() if isinstance(v, str) else v] for k, v in headers.items()})
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
